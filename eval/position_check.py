"""Does a Wan DiT need an absolute position signal to learn what a direction word implies from pure noise?

The tiny teacher without coordinate channels ignored direction (teachers/tiny/README.md): from noise its x0 moved with
the direction word by a seventh of what the data's posterior means imply. The suspected cause was that Wan's only
position signal is relative (RoPE), so from stationary noise it cannot place a shape where the caption's motion
implies; this check pointed to the fix (``model.coordinates``, teachers/wan.py), which the fine-tuned teacher
confirmed. It trains two small Wan DiTs on a proxy of the domain (8 frames of 16x16, one-hot attribute tokens
instead of the text encoder, flow matching with shift 3), identical except that the second also gets (x, y, frame)
coordinate channels as input, and prints each one's x0 change at t = 1 per attribute next to the ideal one.
Exploratory, CPU:

    python -m eval.position_check --steps 1000
"""

import argparse
import time

import numpy as np
import torch
from diffusers import WanTransformer3DModel

from distill.data.synthetic import ATTRIBUTES, render, sample_labels
from distill.schedule import FlowMatching, shift_time
from eval.prompt_sensitivity import ideal_change, swapped
from teachers.wan import coordinate_channels

F, H, W = 8, 16, 16
VALUES = [(a, v) for a, vs in ATTRIBUTES.items() for v in vs]
TEXT_DIM = 64
SCHEDULE = FlowMatching()


def tokens(labels: dict[str, str]) -> torch.Tensor:
    """One one-hot token per attribute: the text pathway without a text encoder's ambiguity."""
    t = torch.zeros(len(ATTRIBUTES), TEXT_DIM)
    for i, a in enumerate(ATTRIBUTES):
        t[i, VALUES.index((a, labels[a]))] = 1.0
    return t


def build(pos: bool) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                 in_channels=6 if pos else 3, out_channels=3, text_dim=TEXT_DIM, freq_dim=64,
                                 ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 eps=1e-6, rope_max_seq_len=64)


def forward(model: WanTransformer3DModel, pos: bool, x_t: torch.Tensor, t: torch.Tensor,
            text: torch.Tensor) -> torch.Tensor:
    """The predicted velocity (noise - x0)."""
    inp = torch.cat([x_t, coordinate_channels(x_t.shape[0], F, H, W, reference_frames=F)], 1) if pos else x_t
    return model(inp, timestep=t * 1000, encoder_hidden_states=text, return_dict=False)[0]


def batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = [sample_labels(rng) for _ in range(n)]
    return (torch.stack([render(lab, F, H, W, rng) for lab in labels]),
            torch.stack([tokens(lab) for lab in labels]))


def train(pos: bool, steps: int, seed: int = 0) -> WanTransformer3DModel:
    model = build(pos)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0, text = batch(rng, 32)
        t = shift_time(torch.rand(32, generator=g), 3.0)  # more time at high noise
        eps = torch.randn(x0.shape, generator=g)
        x_t = SCHEDULE.add_noise(x0, eps, t)
        loss = (forward(model, pos, x_t, t, text) - SCHEDULE.target(x0, eps, t)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def t1_deltas(model: WanTransformer3DModel, pos: bool, attribute: str, num: int = 24, noise_draws: int = 8,
              seed: int = 1) -> tuple[float, float]:
    """Mean |x0(labels) - x0(labels with attribute changed)| at t=1 (averaged over noise draws, i.e. the model's
    posterior-mean estimate) against the data's |E[clip|a] - E[clip|b]|."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    got, ideal = [], []
    for _ in range(num):
        a = sample_labels(rng)
        b = swapped(a, attribute, rng)
        eps = torch.randn(noise_draws, 3, F, H, W, generator=g)
        t = torch.ones(noise_draws)
        xa, xb = (SCHEDULE.split(eps, t, forward(model, pos, eps, t, tokens(lab).expand(noise_draws, -1, -1)))[0]
                  .mean(0) for lab in (a, b))
        got.append((xa - xb).abs().mean().item())
        ideal.append(ideal_change(a, b, 200, rng, F, H, W))
    return round(float(np.mean(got)), 4), round(float(np.mean(ideal)), 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=24, help="caption pairs per attribute at t = 1")
    args = parser.parse_args(argv)
    results = {}
    for pos in (False, True):
        name = "coordinates" if pos else "rope-only"
        start = time.time()
        model = train(pos, args.steps).eval()
        print(f"{name}: trained {args.steps} steps in {time.time() - start:.0f} s", flush=True)
        for attribute in ("color", "size", "direction", "speed"):
            results[name, attribute] = t1_deltas(model, pos, attribute, num=args.pairs)
            print(f"{name:12s} {attribute:10s} x0 change at t=1 {results[name, attribute][0]:.4f}, "
                  f"ideal {results[name, attribute][1]:.4f}", flush=True)
    return results


if __name__ == "__main__":
    main()
