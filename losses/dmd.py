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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill.conditioning import Batch
from distill.students import make_student, rollout
from losses.base import Logs, Networks
from losses.flow_matching import denoising_loss
from teachers.base import Denoiser


def dmd_loss(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """A loss whose gradient in ``x0`` is ``(fake - real) / |x0 - real|_1`` per sample (divided by the
    element count), the normalised distribution-matching gradient of DMD."""
    dims = tuple(range(1, x0.ndim))
    normaliser = (x0.detach() - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
    target = (x0 - (fake_x0 - real_x0) / normaliser).detach()
    return 0.5 * torch.mean((x0.float() - target.float()) ** 2)


@dataclass
class DMDMethod:
    """DMD2 with a ``generator`` (student), a ``critic`` (fake score) and the frozen ``teacher``."""

    times: list[float]  # the student's step list
    guidance: float = 5.0
    t_min: float = 0.02
    t_max: float = 0.98
    time_distribution: str = "logit_normal"  # the critic's denoising times
    roles: tuple[str, ...] = ("critic", "generator")
    weights: dict[str, float] = field(default_factory=lambda: {"dmd": 1.0})

    def __post_init__(self) -> None:
        unknown = set(self.weights) - {"dmd"}
        if unknown:
            raise ValueError(f"method.weights: unknown DMD loss terms {sorted(unknown)}; known: ['dmd']")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        return {"generator": make_student(model), "critic": make_student(model)}, {"teacher": model}

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
            return loss, {"loss": loss.item()}
        x0 = self._generate(student, batch, generator, grad=True)
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(x0.shape[0], generator=generator,
                                                                 device=generator.device)
        t = t.to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
        x_t = schedule.add_noise(x0.detach(), eps, t)
        with torch.no_grad():
            real = teacher.denoise(x_t, t, batch.cond, guidance=self.guidance)
            fake = critic.denoise(x_t, t, batch.cond)
        loss = self.weights["dmd"] * dmd_loss(x0, real, fake)
        return loss, {"loss": loss.item(), "real_fake_gap": (real - fake).abs().mean().item()}
