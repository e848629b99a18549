"""Causal DMD: DMD2 with a chunk-causal student and the bidirectional teacher as the real score (asymmetric
distillation, CausVid, Yin et al. 2025), in two ways of making the student's samples:

- ``diffusion_forcing``: every chunk at an independently drawn step of the student's schedule, reached by the
  student's own block-masked rollout (chunks see earlier chunks noisy, as in diffusion forcing, Chen et al. 2024);
  one forward with gradient gives ``x0`` of all chunks.
- ``self_forcing`` (Huang et al. 2025): the student generates chunk by chunk with its KV cache exactly as at
  inference, every chunk stopping at one randomly drawn step (the same for all chunks of a rollout) that alone
  carries the gradient; the cache is written from the detached ``x0``. Training sees the student's own context,
  so errors do not accumulate at test time. With ``student.rollout_frames`` the rollout runs past the training
  length through the rolling KV window of inference, and each training-length window of it is one sample of the
  loss (Self-Forcing++, Cui et al. 2025): the teacher, which only knows training-length clips, corrects the
  windows a long stream drifts into; a teacher trained on windows of long videos (an offset channel) scores each
  window as the window of the video it is.

The critic (fake score) stays bidirectional like the teacher; the loss terms are :class:`losses.dmd.DMDMethod`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from distill.causal import (
    causal_description,
    chunk_steps,
    forcing_rollout,
    make_causal_student,
    stream_sample,
)
from distill.conditioning import Batch
from distill.config import DataConfig, StudentConfig, cache_window
from losses.base import Logs, Networks
from losses.dmd import DMDMethod
from teachers.base import Denoiser


def self_forcing_exits(steps: int, chunks: int, generator: torch.Generator) -> list[int]:
    """Self-Forcing's exit step of each chunk: one draw per rollout, shared by every chunk (Huang et al. 2025,
    Algorithm 1; ``same_step_across_blocks`` in their code). A rollout is then the student's own sampler stopped at
    that step, and at the last step exactly inference; independent draws per chunk would build almost every
    chunk's context from chunks stopped at other steps, a context inference never gives it."""
    return [int(torch.randint(steps, (1,), generator=generator, device=generator.device))] * chunks


def split_windows(video: Tensor, frames: int) -> Tensor:
    """``[B, C, n * frames, H, W]`` -> ``[B * n, C, frames, H, W]``: each video's windows in a row (the order of
    :meth:`Batch.repeat`)."""
    C, T, H, W = video.shape[1:]
    return video.unflatten(2, (T // frames, frames)).transpose(1, 2).reshape(-1, C, frames, H, W)


@dataclass
class CausalDMDMethod(DMDMethod):
    student: StudentConfig = field(default_factory=lambda: StudentConfig(causal=True))
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def chunk_frames(self) -> int:
        return self.student.chunk_frames

    @property
    def windows(self) -> int:
        """Training-length windows per rollout (self-forcing with ``rollout_frames``; else 1)."""
        return max(1, self.student.rollout_frames // self.data.frames)

    def make_generator(self, model: Denoiser) -> Denoiser:
        return make_causal_student(model, self.student.chunk_frames, self.student.init)

    def describe(self) -> dict:
        return {**super().describe(), "causal": causal_description(self.student, self.data)}

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        """DMD's loss on every window of every rollout: the batch's conditions repeated once per window, with the
        window's place in its rollout as its frame offset (which a teacher of long-video windows, and the critic
        copied from it, read: ``teachers.wan.offset_channel``; other models ignore it)."""
        n = self.windows
        if n == 1:
            return super().loss(role, nets, batch, generator)
        windows = batch.repeat(n)
        offsets = (torch.arange(n) * self.data.frames).repeat(len(batch.cond)).to(batch.cond.text.device)
        windows = replace(windows, cond=replace(windows.cond, frame_offset=offsets))
        return super().loss(role, nets, windows, generator)

    def sample(self, student: Denoiser, batch: Batch, generator: torch.Generator, grad: bool) -> Tensor:
        """``x0`` of the (repeated, :meth:`loss`) batch: one rollout per prompt, split into its windows."""
        B, C, T, H, W = batch.shape
        n, device = self.windows, batch.cond.text.device
        shape = (B // n, C, T * n, H, W)
        noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
        with torch.set_grad_enabled(grad):
            if self.student.mode == "self_forcing":
                chunks = -(-shape[2] // self.chunk_frames)
                exits = self_forcing_exits(len(self.times), chunks, generator)
                video = stream_sample(student, noise, batch.first_of(n).cond, self.times,
                                      generator=generator, grad_steps=exits,
                                      cache_frames=cache_window(self.student.cache_frames, T, self.chunk_frames,
                                                                self.student.sink_frames),
                                      sink_frames=self.student.sink_frames, context_noise=self.student.context_noise,
                                      reencode_frames=self.student.reencode_frames)
                return split_windows(video, T)
            steps = chunk_steps(B, T, self.chunk_frames, len(self.times), generator)
            x_t, t = forcing_rollout(student, noise, batch.cond, self.times, steps, generator)
            return student.denoise(x_t, t, batch.cond)
