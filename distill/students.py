"""Few-step students built from a teacher, and the multi-step sampler they are trained and used with.

A student is a copy of the teacher's network with its own short step list (e.g. 4 steps at
1000/750/500/250 on the teacher's 1000-step scale, shifted like the teacher's schedule). At each step it
predicts ``x0`` and the next state is that prediction re-noised to the next time with fresh noise: the
multi-step generator of DMD2 (Yin et al. 2024) and consistency models (Song et al. 2023).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from distill.conditioning import Conditioning
from distill.schedule import device_times
from teachers.base import Denoiser


def student_times(teacher: Denoiser, steps: int) -> list[float]:
    """The ``steps`` start times of a few-step student, on the teacher's shifted grid."""
    return teacher.schedule.timesteps(steps)[:-1].tolist()


def step_subset(times: list[float], steps: int) -> list[float]:
    """``steps`` of a student's trained times, evenly spaced and starting at its first: a 4-step student
    [t0, t1, t2, t3] samples in 2 steps with [t0, t2] and in 1 with [t0]."""
    if not 1 <= steps <= len(times) or len(times) % steps:
        raise ValueError(f"cannot take {steps} evenly spaced steps of a {len(times)}-step student")
    return times[::len(times) // steps]


def make_student(teacher: Denoiser) -> Denoiser:
    """A trainable copy of the teacher (the DMD/consistency initialisation); in LoRA mode a new view of the
    teacher's shared base, which gets its own adapter (distill/lora.py)."""
    from distill.lora import LoraView

    student = teacher.new_view() if isinstance(teacher, LoraView) else copy.deepcopy(teacher)
    student.requires_grad_(True).train()
    return student


def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` (on its device) and moved to ``x``'s."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)


def rollout(student: Denoiser, noise: Tensor, cond: Conditioning, times: list[float], upto: int,
            generator: torch.Generator | None = None, deterministic: bool = False) -> Tensor:
    """The state ``x_{t_upto}`` that the student's own sampling reaches from ``noise`` (no gradient).

    DMD2's backward simulation: the generator is trained on the inputs it meets at inference. ``deterministic``
    takes the ODE step from each time to the next instead of re-noising the ``x0`` estimate with fresh noise: the
    sampler of a phased consistency student (PCM), whose outputs are consistent only along its own phases.
    """
    x, times = noise, device_times(times, noise.device)
    with torch.no_grad():
        for k in range(upto):
            t = times[k].expand(x.shape[0])
            if deterministic:
                x = student.schedule.step(x, t, times[k + 1], student(x, t, cond))
                continue
            x0 = student.denoise(x, t, cond)
            x = student.schedule.add_noise(x0, noise_like(x0, generator), times[k + 1])
    return x


def few_step_sample(student: Denoiser, noise: Tensor, cond: Conditioning, times: list[float],
                    generator: torch.Generator | None = None, deterministic: bool = False) -> Tensor:
    """Generate with the student's step list: ``x0`` of its last step."""
    x = rollout(student, noise, cond, times, len(times) - 1, generator, deterministic)
    with torch.no_grad():
        return student.denoise(x, torch.full((x.shape[0],), times[-1], device=x.device), cond)
