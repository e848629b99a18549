"""Pieces that several objectives share: noise draws, freezing a network for a step, the student's own
sample by backward simulation, and the light feature heads of discriminators."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from distill.conditioning import Batch
from distill.students import rollout
from teachers.base import Denoiser


def uniform(n: int, low: float | Tensor, high: float | Tensor, generator: torch.Generator,
            device: torch.device) -> Tensor:
    """``n`` draws, uniform in ``[low, high]`` (bounds may be per-sample tensors)."""
    u = torch.rand(n, generator=generator, device=generator.device).to(device)
    return low + (high - low) * u


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` get no gradient inside the block (a generator step through the critic must
    not leave gradients for the critic's next update)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def student_sample(student: Denoiser, batch: Batch, times: list[float], generator: torch.Generator,
                   grad: bool) -> Tensor:
    """A student sample ``x0`` from one of its steps, reached by its own rollout from noise: the "backward
    simulation" of DMD2 (Yin et al. 2024), so that the generator is trained on the inputs it meets at
    inference. Needs no data latents: prompts suffice."""
    shape, device = batch.shape, batch.cond.text.device
    noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
    step = int(torch.randint(len(times), (1,), generator=generator, device=generator.device))
    x = rollout(student, noise, batch.cond, times, step, generator)
    t = torch.full((shape[0],), times[step], device=device)
    with torch.set_grad_enabled(grad):
        return student.denoise(x, t, batch.cond)


class FeatureHead(nn.Module):
    """A light discriminator on a network's intermediate tokens: per-token MLP, averaged to one logit per
    sample (DMD2 puts its GAN classifier on the fake-score network's features, LADD on the teacher's)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        dtype = self.net[1].weight.dtype  # the head's own precision (bf16 under a bf16 engine)
        return self.net(tokens.to(dtype)).float().mean(dim=(1, 2))
