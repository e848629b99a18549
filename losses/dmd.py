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
from distill.students import make_student, noise_like
from losses.adversarial import clean_pair
from losses.base import Logs, Networks
from losses.common import student_sample, uniform
from losses.flow_matching import denoising_loss
from losses.regression import regression_loss
from teachers.base import Denoiser


def dmd_loss(x0: Tensor, real_x0: Tensor, fake_x0: Tensor) -> Tensor:
    """A loss whose gradient in ``x0`` is ``(fake - real) / |x0 - real|_1`` per sample (divided by the
    element count), the normalised distribution-matching gradient of DMD."""
    dims = tuple(range(1, x0.ndim))
    normaliser = (x0.detach() - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
    target = (x0 - (fake_x0 - real_x0) / normaliser).detach()
    return 0.5 * torch.mean((x0.float() - target.float()) ** 2)


DMD_TERMS = ("dmd", "regression")


@dataclass
class DMDMethod:
    """DMD2 with a ``generator`` (student), a ``critic`` (fake score) and the frozen ``teacher``.

    ``weights``: ``dmd`` (the distribution-matching term) and ``regression`` (DMD's regression of the student's
    ``x0`` onto the teacher's ODE endpoints; needs ``data.kind = "ode_pairs"``). DMD2's GAN term is the adversarial term of
    losses/adversarial.py added by ``method.weights.gan`` (``losses.build``), with its heads on the critic's
    features where ``method.adversarial.backbone = "critic"``.
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
        self.weights = {"dmd": 1.0, **self.weights}  # the DMD term is on by default
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")

    def make_generator(self, model: Denoiser) -> Denoiser:
        """The student the generator starts as (a causal student overrides it)."""
        return make_student(model)

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        return {"generator": self.make_generator(model), "critic": make_student(model)}, {"teacher": model}

    def describe(self) -> dict:
        return {"method": "dmd", "timesteps": self.times, "guidance": self.guidance}

    chunk_frames = 0  # frames per chunk of a causal student (losses/causal_dmd.py); 0: bidirectional
    windows = 1  # copies of each sample in a batch (causal DMD repeats it once per window of a long rollout)

    def sample(self, student: Denoiser, batch: Batch, generator: torch.Generator, grad: bool) -> Tensor:
        """The student's backward-simulated sample ``x0`` (a causal student overrides how it is made)."""
        return student_sample(student, batch, self.times, generator, grad)

    def generator_loss(self, nets: Networks, batch: Batch,
                       generator: torch.Generator) -> tuple[Tensor, Logs, Tensor, Tensor]:
        """The generator's loss, its logs, and the sample it was computed on (with gradient) at level 0."""
        student, critic, teacher = nets["generator"], nets["critic"], nets["teacher"]
        x0 = self.sample(student, batch, generator, grad=True)
        t = uniform(x0.shape[0], self.t_min, self.t_max, generator, x0.device)
        x_t = teacher.schedule.add_noise(x0.detach(), noise_like(x0, generator), t)
        with torch.no_grad():
            real = teacher.denoise(x_t, t, batch.cond, guidance=self.guidance)
            fake = critic.denoise(x_t, t, batch.cond)
        loss = self.weights["dmd"] * dmd_loss(x0, real, fake)
        logs = {"real_fake_gap": (real - fake).abs().mean().item()}
        if self.weights.get("regression", 0.0) > 0:  # DMD's regression on teacher ODE pairs (data.kind = ode_pairs)
            regression = regression_loss(student, batch.first_of(self.windows), self.times, generator,
                                         self.chunk_frames)  # each ODE pair once
            loss = loss + self.weights["regression"] * regression
            logs["regression"] = regression.item()
        logs["loss"] = loss.item()
        return loss, logs, x0, torch.zeros_like(t)

    def real_and_fake(self, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Clips of the batch and student samples (no gradient), both at level 0, for a discriminator."""
        return clean_pair(batch, self.sample(nets["generator"], batch, generator, grad=False))

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        if role == "critic":
            x0 = self.sample(nets["generator"], batch, generator, grad=False)
            schedule = nets["teacher"].schedule
            t = schedule.sample_training_time((x0.shape[0],), generator, generator.device, self.time_distribution)
            loss = denoising_loss(nets["critic"], x0, batch.cond, t.to(x0.device), noise_like(x0, generator))
            return loss, {"loss": loss.item(), "denoise": loss.item()}
        loss, logs, _, _ = self.generator_loss(nets, batch, generator)
        return loss, logs
