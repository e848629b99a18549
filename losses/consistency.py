"""Consistency distillation in latent space: latent consistency models (LCM; Luo et al. 2023), AnimateLCM (Wang et
al. 2024) for video, split into phases as in Phased Consistency Models (PCM; Wang et al. 2024).

The teacher's sampling grid (``teacher_steps`` intervals from t = 1 to 0) is cut into as many phases as the student
has steps; the phase edges are the student's step list. A data sample noised to a grid time ``t`` is moved by one
teacher ODE step with classifier-free guidance across ``skip`` grid intervals (clipped at the phase's edge ``s``) to
``t'``. The student's output at ``(x_t, t)`` is its DDIM step to the edge, ``f(x_t, t) = step(x_t, t -> s)``; it is
pulled toward the EMA *target* network's output at ``(x_t', t')`` (or ``x_t'`` itself once ``t'`` is the edge, the
boundary condition). With one phase this is LCM (the edge is ``t = 0`` and ``f`` is the clean sample). A phased
student samples deterministically from edge to edge (``"sampler": "ode"`` in its method.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from distill.conditioning import Batch
from distill.schedule import Schedule
from distill.students import make_student, noise_like
from losses.base import Logs, Networks
from losses.perceptual import lpips_frames
from teachers.base import Denoiser

CD_TERMS = ("cd", "lpips")
DISTANCES = ("huber", "l2")


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Mean of ``sqrt((x - y)^2 + c^2) - c``: L2 for small errors, L1 for large ones (iCT; LCM's training script)."""
    return (((x.float() - y.float()) ** 2 + c**2).sqrt() - c).mean()


def phase_draw(num_intervals: int, phases: int, skip: int, n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Grid indices for ``n`` samples: a start ``j``, the teacher step's end ``min(j + skip, edge)`` and the phase's
    ``edge`` (indices grow toward t = 0)."""
    per = num_intervals // phases
    j = torch.randint(num_intervals, (n,), generator=generator, device=generator.device).cpu()
    edge = (j // per + 1) * per
    return j, torch.minimum(j + skip, edge), edge


@dataclass
class ConsistencyMethod:
    """Trains ``generator`` (the student) against the frozen ``teacher`` and the EMA ``target``; ``weights``:
    ``cd`` (the consistency distance) and ``lpips`` (LPIPS between the frames of the two outputs, pixel-space models;
    ``lpips`` is then a loaded network from :func:`losses.perceptual.load_lpips`)."""

    grid: list[float]  # the teacher solver's times, teacher_steps + 1 of them from 1 to 0
    phases: int  # the student's step count
    skip: int = 2
    guidance: float = 5.0
    distance: str = "huber"
    huber_c: float = 0.001
    target_decay: float = 0.95
    weights: dict[str, float] = field(default_factory=lambda: {"cd": 1.0})
    lpips: nn.Module | None = None
    roles: tuple[str, ...] = ("generator",)

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(CD_TERMS)
        if unknown:
            raise ValueError(f"method.weights: unknown consistency loss terms {sorted(unknown)}; "
                             f"known: {list(CD_TERMS)}")
        self.weights = {"cd": 1.0, "lpips": 0.0, **self.weights}
        intervals = len(self.grid) - 1
        if intervals % self.phases or self.skip < 1:
            raise ValueError(f"a {intervals}-interval teacher grid cannot be cut into {self.phases} phases with skip "
                             f"{self.skip}: need intervals % phases == 0 and skip >= 1")
        if self.distance not in DISTANCES:
            raise ValueError(f"method.consistency.distance = {self.distance!r}; expected one of {list(DISTANCES)}")
        if self.weights["lpips"] > 0 and self.lpips is None:
            raise ValueError("method.weights.lpips > 0 needs an LPIPS network (method.consistency.lpips_path)")

    @property
    def times(self) -> list[float]:
        """The student's step list: the phase starts."""
        return self.grid[::(len(self.grid) - 1) // self.phases][:-1]

    @property
    def ema_targets(self) -> dict[str, tuple[str, float]]:
        """The trainer moves the frozen ``target`` toward ``generator`` after each generator update."""
        return {"target": ("generator", self.target_decay)}

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        frozen: Networks = {"teacher": model, "target": make_student(model)}
        if self.weights["lpips"] > 0:
            channels = getattr(model, "latent_channels", None)
            if channels != 3:
                raise ValueError(f"LPIPS compares frames: it needs a pixel-space model (3 channels), this one has "
                                 f"{channels}-channel latents and training decodes none")
            frozen["lpips"] = self.lpips
        return {"generator": make_student(model)}, frozen

    def describe(self) -> dict:
        return {"method": "cd", "timesteps": self.times, "sampler": "ode", "guidance": self.guidance}

    def _start(self, batch: Batch, schedule: Schedule,
               generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Data noised to grid times: ``(x_t, t, t_next, s)`` and whether ``t_next`` is the phase's edge."""
        if batch.latents is None:
            raise ValueError("consistency distillation needs data latents (noised to grid times), not prompt-only data")
        x0 = batch.latents
        j, j_next, edge = phase_draw(len(self.grid) - 1, self.phases, self.skip, x0.shape[0], generator)
        grid = torch.tensor(self.grid, device=x0.device)
        t, t_next, s = grid[j.to(x0.device)], grid[j_next.to(x0.device)], grid[edge.to(x0.device)]
        x_t = schedule.add_noise(x0, noise_like(x0, generator), t)
        return x_t, t, t_next, s, (j_next == edge).to(x0.device)

    def generator_loss(self, nets: Networks, batch: Batch,
                       generator: torch.Generator) -> tuple[Tensor, Logs, Tensor, Tensor]:
        """The consistency loss, its logs, and the student's output (with gradient) at its level ``s``."""
        student, teacher, target = nets["generator"], nets["teacher"], nets["target"]
        schedule = teacher.schedule
        x_t, t, t_next, s, at_edge = self._start(batch, schedule, generator)
        with torch.no_grad():
            x_next = schedule.step(x_t, t, t_next, teacher.guided(x_t, t, batch.cond, self.guidance))
            aim = schedule.step(x_next, t_next, s, target(x_next, t_next, batch.cond))
            aim = torch.where(at_edge.view(-1, 1, 1, 1, 1), x_next, aim)
        out = schedule.step(x_t, t, s, student(x_t, t, batch.cond))
        if self.distance == "huber":
            cd = pseudo_huber(out, aim, self.huber_c)
        else:
            cd = torch.mean((out.float() - aim.float()) ** 2)
        loss, logs = self.weights["cd"] * cd, {"cd": cd.item()}
        if self.weights["lpips"] > 0:
            perceptual = lpips_frames(nets["lpips"], out, aim)
            loss, logs["lpips"] = loss + self.weights["lpips"] * perceptual, perceptual.item()
        return loss, {"loss": loss.item(), **logs}, out, s

    def real_and_fake(self, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Data and student outputs at the phase edges ``s`` (PCM's adversarial pairs): real clips noised to ``s``."""
        student = nets["generator"]
        x_t, t, _, s, _ = self._start(batch, student.schedule, generator)
        with torch.no_grad():
            fake = student.schedule.step(x_t, t, s, student(x_t, t, batch.cond))
        real = student.schedule.add_noise(batch.latents, noise_like(batch.latents, generator), s)
        return real, fake, s

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        loss, logs, _, _ = self.generator_loss(nets, batch, generator)
        return loss, logs
