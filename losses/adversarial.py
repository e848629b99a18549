"""Adversarial distillation: a discriminator of light heads on intermediate features of a frozen network run on
noised samples, as in latent adversarial diffusion distillation (LADD; Sauer et al. 2024, "Fast High-Resolution
Image Synthesis with Latent Adversarial Diffusion Distillation"), Seaweed-APT (Lin et al. 2025, "Diffusion
Adversarial Post-Training for One-Step Video Generation") and AnimateDiff-Lightning (Lin & Yang 2024), and the GAN
branch of DMD2 (Yin et al. 2024) when the heads read the fake-score critic.

The GAN term is added to any base method that exposes its generator's sample (:class:`GANBase`): DMD (DMD2),
consistency distillation (as in OSV and MCM), or none at all (:class:`RolloutGenerator`: pure adversarial training,
best started from a regression-initialised student). The discriminator is its own trainable role with its own
optimiser and engine in the trainer; the backbone stays frozen, so only the heads learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.conditioning import Batch
from distill.students import make_student, noise_like
from losses.base import Logs, Method, Networks
from losses.common import FeatureHead, frozen, student_sample
from teachers.base import Denoiser

LOSSES = ("hinge", "non_saturating")
BACKBONES = ("teacher", "critic")


class GANBase(Method, Protocol):
    """A method whose generator sample a GAN term can judge: ``generator_loss`` returns its own loss, logs, the
    sample (with gradient) and the sample's noise level ``[B]`` (0 for clean samples); ``real_and_fake`` returns
    real and generated samples at one level (no gradient) for the discriminator's update."""

    def generator_loss(self, nets: Networks, batch: Batch,
                       generator: torch.Generator) -> tuple[Tensor, Logs, Tensor, Tensor]: ...

    def real_and_fake(self, nets: Networks, batch: Batch,
                      generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]: ...


def real_clips(batch: Batch) -> Tensor:
    """The batch's clean latents: the discriminator's real samples."""
    if batch.latents is None:
        raise ValueError("the GAN term needs real clips: a batch with latents, not prompt-only data")
    return batch.latents


def clean_pair(batch: Batch, fake: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Real clips of the batch and the student's samples (no gradient), both clean (level 0)."""
    return real_clips(batch), fake, torch.zeros(fake.shape[0], device=fake.device)


def discriminator_objective(real: Tensor, fake: Tensor, kind: str) -> Tensor:
    """The discriminator's loss on real and fake logits: hinge (LADD, APT) or non-saturating (DMD2)."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "non_saturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {list(LOSSES)}")


def generator_objective(fake: Tensor, kind: str) -> Tensor:
    """The generator's loss on the logits of its samples."""
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {list(LOSSES)}")


class Discriminator(nn.Module):
    """One :class:`FeatureHead` per backbone block in ``layers`` (None: the backbone's middle block); logits
    ``[B, heads]``."""

    def __init__(self, dim: int, layers: list[int] | None):
        super().__init__()
        self.layers = layers
        self.heads = nn.ModuleList(FeatureHead(dim) for _ in (layers or [None]))

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.stack([head(tokens) for head, tokens in zip(self.heads, features)], dim=1)


@dataclass
class Adversarial:
    """The GAN term. Samples at noise level ``level`` are noised further to a time in ``[max(level, t_min), t_max]``
    drawn from ``time_distribution``, the frozen ``backbone`` (a network of the base method: ``teacher`` or
    ``critic``) gives features of the chosen blocks, and the heads score them. ``r1_weight`` adds APT's
    approximate R1 penalty on real samples, ``|D(x) - D(x + sigma n)|^2``, which needs no double backward."""

    backbone: str = "teacher"
    layers: list[int] = field(default_factory=list)
    kind: str = "hinge"
    r1_weight: float = 100.0
    r1_sigma: float = 0.01
    t_min: float = 0.02
    t_max: float = 0.98
    time_distribution: str = "logit_normal"

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"method.adversarial.loss = {self.kind!r}; expected one of {list(LOSSES)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"method.adversarial.backbone = {self.backbone!r}; expected one of {list(BACKBONES)}")

    def make_discriminator(self, model: Denoiser) -> Discriminator:
        return Discriminator(model.feature_dim, list(self.layers) or None)

    def _noised(self, x: Tensor, level: Tensor, generator: torch.Generator, schedule) -> tuple[Tensor, Tensor]:
        low = level.clamp_min(self.t_min)
        u = schedule.sample_training_time((x.shape[0],), generator, generator.device, self.time_distribution)
        t = low + (torch.maximum(low, torch.full_like(low, self.t_max)) - low) * u.to(x.device)
        return schedule.renoise(x, level, t, noise_like(x, generator)), t

    def _logits(self, nets: Networks, x_t: Tensor, t: Tensor, batch: Batch) -> Tensor:
        discriminator = nets["discriminator"]
        return discriminator(nets[self.backbone].features(x_t, t, batch.cond, discriminator.layers or [None]))

    def discriminator_loss(self, nets: Networks, real: Tensor, fake: Tensor, level: Tensor, batch: Batch,
                           generator: torch.Generator) -> tuple[Tensor, Logs]:
        backbone = nets[self.backbone]
        with frozen(backbone):
            real_t, t_real = self._noised(real.detach(), level, generator, backbone.schedule)
            fake_t, t_fake = self._noised(fake.detach(), level, generator, backbone.schedule)
            real_logits = self._logits(nets, real_t, t_real, batch)
            fake_logits = self._logits(nets, fake_t, t_fake, batch)
            loss = discriminator_objective(real_logits, fake_logits, self.kind)
            logs = {"real_logit": real_logits.mean().item(), "fake_logit": fake_logits.mean().item()}
            if self.r1_weight > 0:
                perturbed = real_t + self.r1_sigma * noise_like(real_t, generator)
                r1 = (self._logits(nets, perturbed, t_real, batch) - real_logits).pow(2).mean()
                loss = loss + self.r1_weight * r1
                logs["r1"] = r1.item()
        return loss, {"loss": loss.item(), **logs}

    def generator_loss(self, nets: Networks, fake: Tensor, level: Tensor, batch: Batch,
                       generator: torch.Generator) -> Tensor:
        """The generator's GAN term; gradient reaches only the sample (backbone and heads are frozen)."""
        backbone = nets[self.backbone]
        with frozen(backbone), frozen(nets["discriminator"]):
            fake_t, t = self._noised(fake, level, generator, backbone.schedule)
            return generator_objective(self._logits(nets, fake_t, t, batch), self.kind)


@dataclass
class WithGAN:
    """A base method plus ``weight`` times the GAN term, and the ``discriminator`` role updated before the
    generator. ``name`` is what ``describe`` reports (e.g. ``dmd+gan``, ``cd+gan``, ``gan``)."""

    base: GANBase
    gan: Adversarial
    weight: float
    name: str

    def __post_init__(self) -> None:
        self.roles = tuple(r for r in self.base.roles if r != "generator") + ("discriminator", "generator")

    @property
    def ema_targets(self) -> dict[str, tuple[str, float]]:
        return getattr(self.base, "ema_targets", {})

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        trainable, frozen_nets = self.base.networks(model)
        if self.gan.backbone not in {**trainable, **frozen_nets}:
            raise ValueError(f"method.adversarial.backbone = {self.gan.backbone!r}, but this method has no such "
                             f"network (it has {sorted({**trainable, **frozen_nets})})")
        return {**trainable, "discriminator": self.gan.make_discriminator(model)}, frozen_nets

    def describe(self) -> dict:
        return {**self.base.describe(), "method": self.name, "gan_weight": self.weight}

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        if role == "discriminator":
            real, fake, level = self.base.real_and_fake(nets, batch, generator)
            return self.gan.discriminator_loss(nets, real, fake, level, batch, generator)
        if role != "generator":
            return self.base.loss(role, nets, batch, generator)
        loss, logs, sample, level = self.base.generator_loss(nets, batch, generator)
        gan = self.gan.generator_loss(nets, sample, level, batch, generator)
        loss = loss + self.weight * gan
        return loss, {**logs, "loss": loss.item(), "gan": gan.item()}


@dataclass
class RolloutGenerator:
    """A generator with no loss of its own, sampling by backward simulation at its step list: wrapped by
    :class:`WithGAN` it is pure adversarial training (APT; LADD). Start it from a regression-initialised student
    (``model.source`` = that student's exported directory) rather than from the teacher."""

    times: list[float]
    roles: tuple[str, ...] = ("generator",)

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        return {"generator": make_student(model)}, {"teacher": model}

    def describe(self) -> dict:
        return {"method": "gan", "timesteps": self.times}

    def generator_loss(self, nets: Networks, batch: Batch,
                       generator: torch.Generator) -> tuple[Tensor, Logs, Tensor, Tensor]:
        x0 = student_sample(nets["generator"], batch, self.times, generator, grad=True)
        return x0.new_zeros(()), {}, x0, torch.zeros(x0.shape[0], device=x0.device)

    def real_and_fake(self, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        return clean_pair(batch, student_sample(nets["generator"], batch, self.times, generator, grad=False))

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        raise ValueError(f"a pure GAN generator has no loss of its own for role {role!r}: wrap it in WithGAN")
