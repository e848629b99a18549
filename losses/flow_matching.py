"""The denoising objective of flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2022).

It trains teachers, and the fake-score critic of DMD on the generator's samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from distill.conditioning import Batch, Conditioning
from losses.base import Logs, Networks
from teachers.base import Denoiser


def denoising_loss(net: Denoiser, x0: Tensor, cond: Conditioning, t: Tensor, eps: Tensor) -> Tensor:
    """Mean squared error between the network's native prediction at ``x_t`` and its target."""
    x_t = net.schedule.add_noise(x0, eps, t)
    pred = net(x_t, t, cond)
    return torch.mean((pred.float() - net.schedule.target(x0, eps, t).float()) ** 2)


def drop_text(cond: Conditioning, probability: float, generator: torch.Generator) -> Conditioning:
    """Replace each sample's text by its negative context with ``probability``: the unconditional
    model that classifier-free guidance needs (Ho & Salimans 2022)."""
    if probability == 0.0:
        return cond
    if cond.negative_text is None:
        raise ValueError("cfg_dropout > 0 needs a negative/unconditional text context in the batch")
    drop = torch.rand(len(cond), generator=generator, device=generator.device) < probability
    drop = drop.to(cond.text.device)
    text = torch.where(drop.view(-1, 1, 1), cond.masked_text(negative=True), cond.masked_text())
    return replace(cond, text=text, text_mask=None)


@dataclass
class FlowMatchingMethod:
    """Train the ``generator`` network (a teacher, here) to denoise data at random noise levels."""

    time_distribution: str = "logit_normal"
    cfg_dropout: float = 0.1
    roles: tuple[str, ...] = ("generator",)

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        return {"generator": model}, {}

    def describe(self) -> dict:
        return {"method": "flow"}

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        if batch.latents is None:
            raise ValueError("flow matching needs latents in the batch (prompt-only data has none)")
        net, x0 = nets[role], batch.latents
        t = net.schedule.sample_training_time((x0.shape[0],), generator, generator.device, self.time_distribution)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device)
        t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
        loss = denoising_loss(net, x0, drop_text(batch.cond, self.cfg_dropout, generator), t, eps)
        return loss, {"loss": loss.item()}
