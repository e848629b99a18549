"""Regression on teacher ODE pairs: the initialisation of causal students in CausVid (Yin et al. 2025, "From
Slow Bidirectional to Fast Autoregressive Video Diffusion Models"; also Self-Forcing's initialisation).

``distill ode-pairs`` records the teacher's deterministic sampler (with CFG) from a noise to its ``x0``, keeping
the states at the student's step times. The student learns to map the state at each of its steps straight to
the teacher's ``x0``. A causal student sees every chunk at an independently drawn step (the chunks of one clip
at different noise levels, as diffusion forcing trains them), through the block-masked forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill.causal import causal_description, chunk_steps, make_causal_student
from distill.conditioning import Batch
from distill.config import DataConfig, StudentConfig
from distill.students import make_student
from losses.base import Logs, Networks
from teachers.base import Denoiser


@dataclass
class RegressionMethod:
    """``generator`` only: MSE between the student's ``x0`` from a trajectory state and the teacher's ``x0``."""

    times: list[float]  # the student's step list; the trajectories hold one state per entry
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    roles: tuple[str, ...] = ("generator",)

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        student = make_causal_student(model, self.student.chunk_frames, self.student.init) if self.student.causal else make_student(model)
        return {"generator": student}, {}

    def describe(self) -> dict:
        described = {"method": "regression", "timesteps": self.times}
        if self.student.causal:
            described["causal"] = causal_description(self.student, self.data)
        return described

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        chunk = self.student.chunk_frames if self.student.causal else 0
        loss = regression_loss(nets["generator"], batch, self.times, generator, chunk)
        return loss, {"loss": loss.item()}


def regression_loss(student: Denoiser, batch: Batch, times: list[float], generator: torch.Generator,
                    chunk_frames: int = 0) -> Tensor:
    """MSE between the student's ``x0`` from a recorded trajectory state and the teacher's ``x0``; with
    ``chunk_frames`` > 0 (a causal student) every chunk is taken at its own step. Also DMD's optional
    regression term (DMD, Yin et al. 2024)."""
    trajectory, x0 = batch.extra.get("trajectory"), batch.latents
    if trajectory is None or x0 is None:
        raise ValueError("regression needs ODE-pair batches (trajectory and latents): data.kind = 'ode_pairs'")
    B, K, _, T = trajectory.shape[:4]
    if K != len(times):
        raise ValueError(f"trajectory has {K} states per sample but the student has {len(times)} steps "
                         f"({times}); write the pairs with --student-steps {len(times)}")
    steps = chunk_steps(B, T, chunk_frames or T, K, generator).to(x0.device)  # [B, T]
    index = steps[:, None, None, :, None, None].expand(-1, 1, *trajectory.shape[2:])
    x_t = trajectory.gather(1, index).squeeze(1)
    t = torch.tensor(times, device=x0.device)[steps]
    pred = student.denoise(x_t, t if chunk_frames else t[:, 0], batch.cond)
    return torch.mean((pred.float() - x0.float()) ** 2)
