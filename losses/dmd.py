"""Distribution matching distillation as in DMD2 (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis"; DMD: Yin et al. 2024).

The generator (a few-step student) is pushed along the difference between two scores of its own samples,
re-noised to a random level: the *real* score is the frozen teacher with classifier-free guidance, the
*fake* score is a critic trained with the denoising objective on the generator's samples. The critic is
updated several times per generator update (two time-scale update rule). Each generator sample is made by
"backward simulation": the student's own few-step rollout to a randomly chosen step, then one step with
gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.conditioning import Batch
from distill.students import make_student, rollout
from losses.base import Logs, Networks
from losses.flow_matching import denoising_loss
from teachers.base import Denoiser


class FeatureHead(nn.Module):
    """A light discriminator on a network's intermediate tokens: per-token MLP, averaged to one logit per
    sample (DMD2 puts its GAN classifier on the fake-score network's features)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens.float()).mean(dim=(1, 2))


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


def dmd_loss(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """A loss whose gradient in ``x0`` is ``(fake - real) / |x0 - real|_1`` per sample (divided by the
    element count), the normalised distribution-matching gradient of DMD."""
    dims = tuple(range(1, x0.ndim))
    normaliser = (x0.detach() - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
    target = (x0 - (fake_x0 - real_x0) / normaliser).detach()
    return 0.5 * torch.mean((x0.float() - target.float()) ** 2)


DMD_TERMS = ("dmd", "gan", "gan_critic")


@dataclass
class DMDMethod:
    """DMD2 with a ``generator`` (student), a ``critic`` (fake score) and the frozen ``teacher``.

    ``weights``: ``dmd`` (the distribution-matching term), ``gan`` (the generator's non-saturating GAN term)
    and ``gan_critic`` (the discriminator's term in the critic update; real clips come from the batch). The
    GAN terms use a :class:`FeatureHead` on the critic's middle-block tokens at noise levels in
    ``[t_min, t_max]``.
    """

    times: list[float]  # the student's step list
    guidance: float = 5.0
    t_min: float = 0.02
    t_max: float = 0.98
    time_distribution: str = "logit_normal"  # the critic's denoising times
    roles: tuple[str, ...] = ("critic", "generator")
    weights: dict[str, float] = field(default_factory=lambda: {"dmd": 1.0})

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(DMD_TERMS)
        if unknown:
            raise ValueError(f"method.weights: unknown DMD loss terms {sorted(unknown)}; known: {list(DMD_TERMS)}")
        self.weights = {"dmd": 1.0, "gan": 0.0, "gan_critic": 0.0, **self.weights}  # the DMD term is on by default
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")

    @property
    def uses_gan(self) -> bool:
        return self.weights["gan"] > 0 or self.weights["gan_critic"] > 0

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        critic = make_student(model)
        if self.uses_gan:
            critic.gan_head = FeatureHead(model.feature_dim)  # trained with the critic, in its engine
        return {"generator": make_student(model), "critic": critic}, {"teacher": model}

    def _noised(self, x0: Tensor, generator: torch.Generator, schedule) -> tuple[Tensor, Tensor]:
        """``x0`` re-noised to a random level in ``[t_min, t_max]``, and that level."""
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(x0.shape[0], generator=generator,
                                                                 device=generator.device)
        t = t.to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
        return schedule.add_noise(x0, eps, t), t

    def _logits(self, critic: Denoiser, x0: Tensor, batch: Batch, generator: torch.Generator) -> Tensor:
        x_t, t = self._noised(x0, generator, critic.schedule)
        return critic.gan_head(critic.features(x_t, t, batch.cond))

    def describe(self) -> dict:
        return {"method": "dmd", "timesteps": self.times, "guidance": self.guidance}

    def _generate(self, student: Denoiser, batch: Batch, generator: torch.Generator, grad: bool) -> Tensor:
        """A student sample ``x0`` from one of its steps, reached by its own rollout."""
        shape, device = batch.shape, batch.cond.text.device  # DMD needs no data latents: prompts suffice
        noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
        step = int(torch.randint(len(self.times), (1,), generator=generator, device=generator.device))
        x = rollout(student, noise, batch.cond, self.times, step, generator)
        t = torch.full((shape[0],), self.times[step], device=device)
        with torch.set_grad_enabled(grad):
            return student.denoise(x, t, batch.cond)

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        student, critic, teacher = nets["generator"], nets["critic"], nets["teacher"]
        schedule = teacher.schedule
        if role == "critic":
            x0 = self._generate(student, batch, generator, grad=False)
            t = schedule.sample_training_time((x0.shape[0],), generator, generator.device, self.time_distribution)
            eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
            loss = denoising_loss(critic, x0, batch.cond, t.to(x0.device), eps)
            logs = {"denoise": loss.item()}
            if self.weights["gan_critic"] > 0:
                if batch.latents is None:
                    raise ValueError("the GAN term needs real clips: a batch with latents, not prompt-only data")
                gan = (F.softplus(-self._logits(critic, batch.latents, batch, generator)).mean()
                       + F.softplus(self._logits(critic, x0, batch, generator)).mean())
                loss = loss + self.weights["gan_critic"] * gan
                logs["gan"] = gan.item()
            return loss, {"loss": loss.item(), **logs}
        x0 = self._generate(student, batch, generator, grad=True)
        x_t, t = self._noised(x0.detach(), generator, schedule)
        with torch.no_grad():
            real = teacher.denoise(x_t, t, batch.cond, guidance=self.guidance)
            fake = critic.denoise(x_t, t, batch.cond)
        loss = self.weights["dmd"] * dmd_loss(x0, real, fake)
        logs = {"real_fake_gap": (real - fake).abs().mean().item()}
        if self.weights["gan"] > 0:
            with frozen(critic):
                gan = F.softplus(-self._logits(critic, x0, batch, generator)).mean()
            loss = loss + self.weights["gan"] * gan
            logs["gan"] = gan.item()
        return loss, {"loss": loss.item(), **logs}
