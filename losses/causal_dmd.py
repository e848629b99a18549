"""Causal DMD: DMD2 with a chunk-causal student and the bidirectional teacher as the real score (asymmetric
distillation, CausVid, Yin et al. 2025), in two ways of making the student's samples:

- ``diffusion_forcing``: every chunk at an independently drawn step of the student's schedule, reached by the
  student's own block-masked rollout (chunks see earlier chunks noisy, as in diffusion forcing, Chen et al. 2024);
  one forward with gradient gives ``x0`` of all chunks.
- ``self_forcing`` (Huang et al. 2025): the student generates chunk by chunk with its KV cache exactly as at
  inference, every chunk stopping at one randomly drawn step (the same for all chunks of a rollout) that alone
  carries the gradient; the cache is written from the detached ``x0``. Training sees the student's own context,
  so errors do not accumulate at test time.

The critic (fake score) stays bidirectional like the teacher; the loss terms are :class:`losses.dmd.DMDMethod`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill.causal import causal_description, chunk_steps, forcing_rollout, make_causal_student, stream_sample
from distill.conditioning import Batch
from distill.config import DataConfig, StudentConfig
from losses.dmd import DMDMethod
from teachers.base import Denoiser


def self_forcing_exits(frame_steps: Tensor, chunk_frames: int) -> list[int]:
    """Self-Forcing's exit step of each chunk: one draw per rollout, shared by every chunk (Huang et al. 2025,
    Algorithm 1; ``same_step_across_blocks`` in their code). A rollout is then the student's own sampler stopped at
    that step, and at the last step exactly inference; independent draws per chunk would build almost every
    chunk's context from chunks stopped at other steps, a context inference never gives it."""
    chunks = -(-frame_steps.shape[1] // chunk_frames)
    return [int(frame_steps[0, 0])] * chunks


@dataclass
class CausalDMDMethod(DMDMethod):
    student: StudentConfig = field(default_factory=lambda: StudentConfig(causal=True))
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def chunk_frames(self) -> int:
        return self.student.chunk_frames

    def make_generator(self, model: Denoiser) -> Denoiser:
        return make_causal_student(model, self.student.chunk_frames, self.student.init)

    def describe(self) -> dict:
        return {**super().describe(), "causal": causal_description(self.student, self.data)}

    def sample(self, student: Denoiser, batch: Batch, generator: torch.Generator, grad: bool) -> Tensor:
        shape, device = batch.shape, batch.cond.text.device
        noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
        steps = chunk_steps(shape[0], shape[2], self.student.chunk_frames, len(self.times), generator)
        with torch.set_grad_enabled(grad):
            if self.student.mode == "self_forcing":
                exits = self_forcing_exits(steps, self.student.chunk_frames)
                return stream_sample(student, noise, batch.cond, self.times, generator=generator, grad_steps=exits)
            x_t, t = forcing_rollout(student, noise, batch.cond, self.times, steps, generator)
            return student.denoise(x_t, t, batch.cond)
