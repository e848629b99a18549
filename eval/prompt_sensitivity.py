"""How much a denoiser's ``x0`` prediction listens to each attribute of the prompt, per noise level.

A teacher can only follow an attribute it reads from the text. For real clips of the synthetic domain noised to
time ``t``, this changes one attribute word of the caption (same template, same synonym slot, same noise) and
measures the mean absolute change of the predicted ``x0``. An attribute whose change moves ``x0`` by about nothing
at every ``t`` is ignored by the text pathway: the model can only get it right by chance or from the noisy input.
It costs a few forwards per attribute, so it runs on a CPU in a minute and checks a retrained teacher before a
full probe evaluation.

At ``t = 1`` the input is pure noise and the best possible ``x0`` is the posterior mean of the clips that fit the
caption, so the change that changing the word *should* make is known from the data alone: ``ideal_delta_x0``, the
same pairs' difference of mean clips (each over ``--posterior-clips`` renders). A ``delta_x0`` far below it means
the model has not learnt what that word implies from noise.

    python -m eval.prompt_sensitivity --teacher tiny --num 32 --out eval/results/tiny_teacher_sensitivity.json
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from distill.conditioning import Conditioning
from distill.data.synthetic import ATTRIBUTES, caption, render, sample_labels
from distill.text import TextEncoder
from eval.results import write_results
from teachers.base import Denoiser


def swapped(labels: dict[str, str], attribute: str, rng: np.random.Generator) -> dict[str, str]:
    """``labels`` with ``attribute`` changed to another value drawn from ``rng``."""
    others = [v for v in ATTRIBUTES[attribute] if v != labels[attribute]]
    return {**labels, attribute: others[int(rng.integers(len(others)))]}


def twin_captions(labels: dict[str, str], other: dict[str, str], seed: int) -> tuple[str, str]:
    """Captions of two label sets drawn with the same template and synonym choices (one generator seed)."""
    return caption(labels, np.random.default_rng(seed)), caption(other, np.random.default_rng(seed))


def mean_clip(labels: dict[str, str], clips: int, rng: np.random.Generator, frames: int, height: int,
              width: int) -> torch.Tensor:
    """The posterior mean of the clips with these labels (over start positions): the ideal x0 from pure noise."""
    return torch.stack([render(labels, frames, height, width, rng) for _ in range(clips)]).mean(0)


def ideal_change(labels: dict[str, str], other: dict[str, str], clips: int, rng: np.random.Generator, frames: int,
                 height: int, width: int) -> float:
    """Mean |E[clip | labels] - E[clip | other]|: how far x0 from pure noise should move between the two captions."""
    return (mean_clip(labels, clips, rng, frames, height, width)
            - mean_clip(other, clips, rng, frames, height, width)).abs().mean().item()


@torch.no_grad()
def sensitivity(model: Denoiser, encoder: TextEncoder, times: list[float], num: int, seed: int = 0,
                frames: int = 16, height: int = 32, width: int = 32, posterior_clips: int = 200) -> list[dict]:
    """One row per (attribute, time): mean |x0(caption) - x0(caption with that attribute changed)| over ``num``
    real clips, next to the mean |x0 - clip| error of the prediction itself (the scale to read it against), and at
    t = 1 the ideal change (:func:`ideal_change`)."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    rows = []
    for attribute in ATTRIBUTES:
        labels = [sample_labels(rng) for _ in range(num)]
        others = [swapped(lab, attribute, rng) for lab in labels]
        clips = torch.stack([render(lab, frames, height, width, rng) for lab in labels]).to(device)
        pairs = [twin_captions(a, b, seed * 100_003 + i) for i, (a, b) in enumerate(zip(labels, others))]
        text, mask = encoder.encode([a for a, _ in pairs] + [b for _, b in pairs])
        cond = Conditioning(text.to(device), mask.to(device))
        noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        for t in times:
            x_t = model.schedule.add_noise(clips, noise, t).repeat(2, 1, 1, 1, 1)
            x0 = model.denoise(x_t, torch.full((2 * num,), t, device=device), cond).float()
            own, changed = x0[:num], x0[num:]
            row = {"attribute": attribute, "t": t, "num_clips": num,
                   "delta_x0": round((own - changed).abs().mean().item(), 5),
                   "x0_error": round((own - clips).abs().mean().item(), 5)}
            if t == 1.0:
                ideal = np.mean([ideal_change(a, b, posterior_clips, rng, frames, height, width)
                                 for a, b in zip(labels, others)])
                row["ideal_delta_x0"] = round(float(ideal), 5)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    import teachers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="tiny", help="'tiny', a preset, config .json or model directory")
    parser.add_argument("--times", type=float, nargs="+", default=[0.5, 0.8, 0.95, 0.99, 1.0])
    parser.add_argument("--num", type=int, default=32, help="real clips per attribute")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--posterior-clips", type=int, default=200,
                        help="renders per label set for the ideal change at t = 1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="", help="results JSON (RESULTS.md shape); nothing written when empty")
    args = parser.parse_args(argv)
    if args.num < 1 or args.posterior_clips < 1 or not all(0.0 <= t <= 1.0 for t in args.times):
        parser.error("--num and --posterior-clips must be >= 1 and every --times value in [0, 1]")

    device = torch.device(args.device)
    model = teachers.load_spec(args.teacher).to(device).float().eval()
    encoder = TextEncoder.from_pretrained(device=device)
    rows = sensitivity(model, encoder, args.times, args.num, args.seed, posterior_clips=args.posterior_clips)
    table = {(r["attribute"], r["t"]): r["delta_x0"] for r in rows}
    ideal = {r["attribute"]: r["ideal_delta_x0"] for r in rows if "ideal_delta_x0" in r}
    header = "".join(f"{'t=' + str(t):>10s}" for t in args.times)
    print(f"{'attribute':12s}{header}" + ("   ideal t=1" if ideal else ""))
    for attribute in ATTRIBUTES:
        print(f"{attribute:12s}" + "".join(f"{table[attribute, t]:10.4f}" for t in args.times)
              + (f"{ideal[attribute]:12.4f}" if ideal else ""))
    if args.out:
        notes = (f"{args.num} real clips per attribute (seed {args.seed}), one noise draw per clip shared by both "
                 "captions; delta_x0 = mean |x0(caption) - x0(caption with only that attribute changed)| in [-1, 1] "
                 "pixel units, same template and synonym slot; x0_error = mean |x0 - clip| of the unchanged caption. "
                 "No guidance: the conditional prediction alone. ideal_delta_x0 (t = 1 rows): the same pairs' "
                 f"mean |E[clip | labels] - E[clip | changed labels]|, each mean over {args.posterior_clips} renders: "
                 "what the change would be for a denoiser that has learnt the data's posterior mean.")
        write_results(args.out, rows, device, notes)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
