"""Probe metrics for the synthetic moving-shapes domain (distill/data/synthetic.py).

A small 3-D conv classifier is trained on freshly rendered clips to predict every attribute of
ATTRIBUTES. It judges generated videos two ways:

- **attribute accuracy**: the probe's prediction of each attribute is compared with the attribute
  the prompt asked for (the generator was given the caption of those labels);
- **FVD-probe**: the Frechet distance between Gaussians fitted to the probe's penultimate-layer
  features of generated clips and of real clips (``reference_features``), an FVD whose feature
  extractor knows this domain instead of Kinetics.

Training adds noise, blur and brightness/contrast jitter so the probe still reads imperfect
generated videos; held-out validation uses clean clips. ``python -m eval.probe train --out
eval/probe_weights --steps 5000 --device cpu`` reproduces the shipped weights in
``eval/probe_weights/`` (``config.json`` + ``model.safetensors``).

Every clip shows its ``bounce`` value (the shape meets a wall in the first half of the clip, see
``sample_start``), so every attribute can be read from every clip.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.data.synthetic import ATTRIBUTES, MovingShapes, labels_to_indices, render, sample_labels
from eval.frechet import frechet_from_features

__all__ = [
    "DEFAULT_WEIGHTS",
    "REFERENCE_SEED",
    "VALIDATION_SEED",
    "Probe",
    "ProbeNet",
    "attribute_accuracy",
    "augment",
    "fvd_probe",
    "main",
    "reference_features",
    "render_batch",
    "validation_clips",
    "train_probe",
]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "probe_weights"
"""Directory of the shipped probe: ``config.json`` + ``model.safetensors``."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

VALIDATION_SEED = 900_001
"""Seed of the held-out validation clips written into config.json (never a training stream)."""

REFERENCE_SEED = 900_002
"""Default seed of the real clips that FVD-probe compares against (differs from training and validation)."""

_TRAIN_STREAM = 0x7472  # third word of the training RNG key, so training clips never alias MovingShapes(seed)
_VAL_STREAM = 0x76616C


class ProbeNet(nn.Module):
    """Compact 3-D conv net: ``[B, 3, T, H, W]`` in [-1, 1] -> features ``[B, feature_dim]`` + one logit head per attribute.

    Stem: a ``(3, 4, 4)`` conv with spatial stride 2 (sees every pixel, halves H and W); then 3x3x3
    conv/BN/ReLU blocks alternating stride 1 and stride 2. Global average and max pooling over
    (T, H, W) make any clip size work (max pooling keeps the small, sparse evidence such as a shape
    touching a wall). A linear layer + GELU gives the feature vector (the penultimate layer, used
    for FVD-probe), and the heads are linear classifiers on it.
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 48, 64, 128),
        feature_dim: int = 128,
        attributes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {list(widths)}")
        attributes = ATTRIBUTES if attributes is None else attributes
        self.widths = [int(w) for w in widths]
        self.feature_dim = int(feature_dim)
        self.attributes = {a: tuple(v) for a, v in attributes.items()}
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate(self.widths):
            if i == 0:
                conv = nn.Conv3d(cin, cout, (3, 4, 4), (1, 2, 2), (1, 1, 1), bias=False)
            else:
                stride = 1 if i % 2 == 1 else 2
                conv = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
            layers += [conv, nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(2 * cin, self.feature_dim)
        self.heads = nn.ModuleDict({a: nn.Linear(self.feature_dim, len(v)) for a, v in self.attributes.items()})

    def config(self) -> dict:
        """Constructor arguments, for config.json."""
        return {"widths": self.widths, "feature_dim": self.feature_dim, "attributes": {a: list(v) for a, v in self.attributes.items()}}

    def features(self, videos: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, feature_dim]``."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must be [B, 3, T, H, W], got shape {tuple(videos.shape)}")
        h = self.trunk(videos)
        pooled = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)
        return F.gelu(self.embed(pooled))

    def forward(self, videos: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Features and logits per attribute."""
        feats = self.features(videos)
        return feats, {a: head(feats) for a, head in self.heads.items()}


def _as_batch(videos: Tensor | Sequence[Tensor]) -> Tensor:
    """Stack a list of ``[3, T, H, W]`` clips; pass a ``[N, 3, T, H, W]`` tensor through."""
    if isinstance(videos, Tensor):
        return videos
    if len(videos) == 0:
        raise ValueError("videos is empty")
    return torch.stack(list(videos))


class Probe:
    """A trained ProbeNet in eval mode with batched, gradient-free helpers."""

    def __init__(self, net: ProbeNet, config: dict | None = None, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.config = config or {"architecture": net.config()}

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> Probe:
        """Load ``config.json`` + ``model.safetensors`` from ``path`` (default: the shipped ``eval/probe_weights``)."""
        root = Path(DEFAULT_WEIGHTS if path is None else path)
        config_file, weights_file = root / CONFIG_NAME, root / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"probe file not found: {f} (train one with `python -m eval.probe train --out {root}`)"
                )
        config = json.loads(config_file.read_text())
        if "architecture" not in config:
            raise ValueError(f"{config_file}: missing key 'architecture'")
        arch = config["architecture"]
        attributes = {a: tuple(v) for a, v in arch.get("attributes", {}).items()}
        if attributes != dict(ATTRIBUTES):
            raise ValueError(
                f"{config_file}: the probe was trained on attributes {attributes}, but the domain now has "
                f"{dict(ATTRIBUTES)}; retrain it"
            )
        net = ProbeNet(widths=arch["widths"], feature_dim=arch["feature_dim"], attributes=attributes)
        state = load_file(str(weights_file), device="cpu")
        missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
        if missing or unexpected:
            raise ValueError(f"{weights_file}: missing tensors {sorted(missing)}, unexpected tensors {sorted(unexpected)}")
        net.load_state_dict(state)
        return cls(net, config, device)

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` (weights on the CPU, contiguous) into directory ``path``."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(root / WEIGHTS_NAME), metadata={"format": "pt", "model": "ProbeNet"})
        config = dict(self.config, architecture=self.net.config())
        (root / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    @torch.no_grad()
    def _run(self, videos: Tensor | Sequence[Tensor], batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
        videos = _as_batch(videos)
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must be [N, 3, T, H, W], got shape {tuple(videos.shape)}")
        feats, logits = [], {a: [] for a in self.net.attributes}
        for i in range(0, videos.shape[0], batch_size):
            chunk = videos[i : i + batch_size].to(self.device, torch.float32)
            f, lg = self.net(chunk)
            feats.append(f.float().cpu())
            for a in logits:
                logits[a].append(lg[a].float().cpu())
        return torch.cat(feats), {a: torch.cat(v) for a, v in logits.items()}

    def features(self, videos: Tensor | Sequence[Tensor], batch_size: int = 64) -> Tensor:
        """Penultimate-layer features ``[N, feature_dim]`` (float32, CPU) of clips ``[N, 3, T, H, W]`` in [-1, 1]."""
        return self._run(videos, batch_size)[0]

    def logits(self, videos: Tensor | Sequence[Tensor], batch_size: int = 64) -> dict[str, Tensor]:
        """Logits ``[N, classes]`` per attribute."""
        return self._run(videos, batch_size)[1]

    def predict(self, videos: Tensor | Sequence[Tensor], batch_size: int = 64) -> dict[str, Tensor]:
        """Predicted class id (index into ``ATTRIBUTES[attr]``) per attribute, LongTensor ``[N]`` each."""
        return {a: v.argmax(dim=1) for a, v in self.logits(videos, batch_size).items()}


def attribute_accuracy(
    predictions: Mapping[str, Tensor | Sequence[int] | np.ndarray], labels: Sequence[Mapping[str, str]]
) -> dict[str, float]:
    """Fraction of clips whose predicted class equals the labelled (for generated clips: prompted) one.

    Returns one entry per attribute of ATTRIBUTES and ``"mean"``, their unweighted mean.
    """
    if len(labels) == 0:
        raise ValueError("labels is empty")
    targets = [labels_to_indices(lab) for lab in labels]
    out: dict[str, float] = {}
    for attribute in ATTRIBUTES:
        if attribute not in predictions:
            raise ValueError(f"predictions has no entry for attribute {attribute!r}")
        pred = torch.as_tensor(np.asarray(predictions[attribute])).reshape(-1).long()
        if pred.shape[0] != len(labels):
            raise ValueError(f"predictions[{attribute!r}] has {pred.shape[0]} entries, labels has {len(labels)}")
        target = torch.tensor([t[attribute] for t in targets])
        out[attribute] = float((pred == target).float().mean())
    out["mean"] = float(np.mean([out[a] for a in ATTRIBUTES]))
    return out


def _features_of(probe: Probe, x: Tensor | Sequence[Tensor], name: str) -> Tensor:
    """Videos ``[N, 3, T, H, W]`` (or a list of clips) -> features; a 2-D tensor is taken as features already."""
    if isinstance(x, Tensor) and x.ndim == 2:
        if x.shape[1] != probe.feature_dim:
            raise ValueError(f"{name}: features have dim {x.shape[1]}, the probe gives {probe.feature_dim}")
        return x
    return probe.features(x)


def fvd_probe(
    probe: Probe, fake_videos: Tensor | Sequence[Tensor], real_videos: Tensor | Sequence[Tensor]
) -> float:
    """Frechet distance between probe features of generated and real clips (lower is better).

    Either argument may also be a precomputed ``[N, feature_dim]`` feature tensor (e.g. from
    ``reference_features``). The value depends on the sample counts (the covariance estimate is
    biased for small N), so compare numbers computed with the same counts.
    """
    return frechet_from_features(_features_of(probe, fake_videos, "fake_videos"), _features_of(probe, real_videos, "real_videos"))


def real_videos(num: int, frames: int = 16, height: int = 32, width: int = 32, seed: int = REFERENCE_SEED,
                length: int | None = None) -> tuple[Tensor, list[dict]]:
    """``num`` real clips ``MovingShapes(num, frames, height, width, seed, length)`` stacked, with their labels;
    ``length > frames`` continues each clip's motion (what a perfect streaming generator would make)."""
    data = MovingShapes(num, frames, height, width, seed, length=length)
    items = [data[i] for i in range(num)]
    return torch.stack([item["video"] for item in items]), [item["labels"] for item in items]


def reference_features(
    probe: Probe,
    num: int = 1024,
    frames: int = 16,
    height: int = 32,
    width: int = 32,
    seed: int = REFERENCE_SEED,
    batch_size: int = 64,
) -> Tensor:
    """Probe features ``[num, feature_dim]`` of ``num`` real clips ``MovingShapes(num, frames, height, width, seed)``.

    The default seed is used by neither training nor validation, so these are unseen real clips.
    """
    return probe.features(real_videos(num, frames, height, width, seed)[0], batch_size)


# ----------------------------------------------------------------------------------------------
# training


def render_batch(
    rng: np.random.Generator, num: int, frames: int = 16, height: int = 32, width: int = 32
) -> tuple[Tensor, list[dict[str, str]]]:
    """``num`` fresh clips ``[num, 3, T, H, W]`` with uniformly drawn labels, and their labels."""
    labels = [sample_labels(rng) for _ in range(num)]
    videos = torch.stack([render(lab, frames, height, width, rng) for lab in labels])
    return videos, labels


def _gaussian_kernels(sigma: Tensor, radius: int = 2) -> Tensor:
    """Normalised 1-D Gaussian kernels ``[B, 2 radius + 1]``; sigma 0 gives the identity."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur(videos: Tensor, sigma: Tensor) -> Tensor:
    """Separable per-clip spatial Gaussian blur with replicate padding (frames blurred independently)."""
    kernels = _gaussian_kernels(sigma).to(videos)  # [B, K]
    radius = (kernels.shape[1] - 1) // 2
    out = videos
    for dim in (3, 4):
        size = out.shape[dim]
        pad = [0] * 6
        pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = radius
        padded = F.pad(out, pad, mode="replicate")
        acc = torch.zeros_like(out)
        for j in range(kernels.shape[1]):
            acc += kernels[:, j].view(-1, 1, 1, 1, 1) * padded.narrow(dim, j, size)
        out = acc
    return out


def augment(videos: Tensor, generator: torch.Generator, max_noise: float = 0.35) -> Tensor:
    """Per-clip photometric augmentations that generated videos show, keeping every attribute readable.

    - brightness: add U(-0.08, 0.08) (in [-1, 1] units) to all channels plus U(-0.03, 0.03) per channel;
    - contrast: scale around the clip mean by U(0.85, 1.15);
    - blur: with probability 0.35, spatial Gaussian blur with sigma U(0.3, 0.9) px;
    - noise: with probability 0.75, additive Gaussian noise of std ``max_noise * U(0, 1) ** 1.5``.
    """
    b = videos.shape[0]

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return torch.rand(*shape, generator=generator) * (hi - lo) + lo

    x = videos
    sigma = torch.where(u(b) < 0.35, u(b, lo=0.3, hi=0.9), torch.zeros(b))
    x = _blur(x, sigma)
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (x - mean) * u(b, 1, 1, 1, 1, lo=0.85, hi=1.15) + mean
    x = x + u(b, 1, 1, 1, 1, lo=-0.08, hi=0.08) + u(b, 3, 1, 1, 1, lo=-0.03, hi=0.03)
    noise_std = torch.where(u(b) < 0.75, max_noise * u(b) ** 1.5, torch.zeros(b))
    x = x + noise_std.view(-1, 1, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x


def validation_clips(
    num: int, seed: int = VALIDATION_SEED, frames: int = 16, height: int = 32, width: int = 32
) -> tuple[Tensor, list[dict[str, str]]]:
    """Held-out clean clips with their labels."""
    videos, labels = [], []
    for i in range(num):
        rng = np.random.default_rng([seed, _VAL_STREAM, i])
        lab = sample_labels(rng)
        videos.append(render(lab, frames, height, width, rng))
        labels.append(lab)
    return torch.stack(videos), labels


def train_probe(
    out_dir: str | Path,
    steps: int = 5000,
    batch_size: int = 32,
    lr: float = 2e-3,
    device: str = "cpu",
    seed: int = 0,
    num_val: int = 1024,
    *,
    widths: Sequence[int] = (16, 32, 48, 64, 128),
    feature_dim: int = 128,
    frames: int = 16,
    height: int = 32,
    width: int = 32,
    noise_levels: Sequence[float] = (0.1, 0.2),
    progress: bool = True,
) -> dict[str, float]:
    """Train a probe on freshly rendered, augmented clips; write config.json + model.safetensors to ``out_dir``.

    AdamW with linear warm-up and cosine decay, cross-entropy summed over attributes. Returns the
    accuracies on ``num_val`` held-out clean clips (also stored in config.json, together with the
    accuracies under Gaussian noise of each std in ``noise_levels``).
    """
    if steps < 1 or batch_size < 1 or num_val < 1:
        raise ValueError(f"steps, batch_size and num_val must be >= 1, got {steps}, {batch_size}, {num_val}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    net = ProbeNet(widths, feature_dim).to(dev)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, min(200, steps // 20))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    def targets_of(labels: list[dict[str, str]]) -> dict[str, Tensor]:
        return {a: torch.tensor([ATTRIBUTES[a].index(lab[a]) for lab in labels], device=dev) for a in ATTRIBUTES}

    t0 = time.time()
    net.train()
    bar = tqdm(range(steps), desc="train probe", disable=not progress, dynamic_ncols=True)
    running = None
    for step in bar:
        rng = np.random.default_rng([seed, _TRAIN_STREAM, step])
        videos, labels = render_batch(rng, batch_size, frames, height, width)
        videos = augment(videos, gen).to(dev)
        targets = targets_of(labels)
        _, logits = net(videos)
        loss = sum(F.cross_entropy(logits[a], targets[a]) for a in ATTRIBUTES)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr_at(step):.2e}")
    train_seconds = time.time() - t0

    net.eval()
    config = {
        "architecture": net.config(),
        "input": {"frames": frames, "height": height, "width": width, "range": [-1.0, 1.0], "layout": "[B, 3, T, H, W]"},
        "training": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": "AdamW(weight_decay=1e-4 on weights), linear warm-up + cosine decay",
            "warmup_steps": warmup,
            "seed": seed,
            "device": str(dev),
            "augment": "augment(): brightness/contrast jitter, blur p=0.35 sigma U(0.3,0.9), noise p=0.75 std 0.35*U^1.5",
            "train_seconds": round(train_seconds, 1),
            "clips_seen": steps * batch_size,
            "torch": torch.__version__,
            "host": platform.machine(),
            "command": f"python -m eval.probe train --out {out_dir} --steps {steps} --batch-size {batch_size} "
            f"--lr {lr} --device {device} --seed {seed} --num-val {num_val}",
        },
    }
    probe = Probe(net, config, dev)
    videos, labels = validation_clips(num_val, VALIDATION_SEED, frames, height, width)
    clean = attribute_accuracy(probe.predict(videos), labels)
    noise_gen = torch.Generator().manual_seed(VALIDATION_SEED)
    noisy = {}
    for std in noise_levels:
        noisy[str(std)] = attribute_accuracy(probe.predict(videos + std * torch.randn(videos.shape, generator=noise_gen)),
                                             labels)
    config["validation"] = {
        "num_clips": num_val,
        "seed": VALIDATION_SEED,
        "clean": {k: round(v, 4) for k, v in clean.items()},
        "gaussian_noise": {k: {a: round(v, 4) for a, v in acc.items()} for k, acc in noisy.items()},
    }
    probe.config = config
    probe.save(out)
    return clean


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m eval.probe train ...`` trains and writes a probe; ``evaluate`` reports accuracy and FVD-probe."""
    parser = argparse.ArgumentParser(prog="python -m eval.probe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a probe on rendered clips and write config.json + model.safetensors")
    tr.add_argument("--out", required=True, help="output directory (eval/probe_weights for the shipped probe)")
    tr.add_argument("--steps", type=int, default=5000)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--num-val", type=int, default=1024)
    ev = sub.add_parser("evaluate", help="accuracy (clean and noisy) and FVD-probe of real clips for a trained probe")
    ev.add_argument("--weights", default=None, help="probe directory (default: the shipped eval/probe_weights)")
    ev.add_argument("--num", type=int, default=512)
    ev.add_argument("--seed", type=int, default=12345)
    ev.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "train":
        acc = train_probe(args.out, args.steps, args.batch_size, args.lr, args.device, args.seed, args.num_val)
        print(json.dumps(acc, indent=2))
        return
    probe = Probe.load(args.weights, args.device)
    data = MovingShapes(args.num, seed=args.seed)
    items = [data[i] for i in range(args.num)]
    videos = torch.stack([it["video"] for it in items])
    labels = [it["labels"] for it in items]
    gen = torch.Generator().manual_seed(args.seed)
    report = {"clean": attribute_accuracy(probe.predict(videos), labels)}
    for std in (0.1, 0.2, 0.3):
        noisy = videos + std * torch.randn(videos.shape, generator=gen)
        report[f"noise_{std}"] = attribute_accuracy(probe.predict(noisy), labels)
    ref = reference_features(probe, args.num)
    report["fvd_probe_real_vs_real"] = fvd_probe(probe, videos, ref)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
