"""Teacher ODE pairs for regression initialisation (CausVid, Yin et al. 2025): the teacher's deterministic
sampler with CFG run from noise to ``x0``, keeping the states at a few-step student's step times.

With ``teacher_steps`` a multiple of ``student_steps``, the student's times lie on the teacher's grid (both are
the same shifted uniform grid), so the recorded states are exact points of the teacher's discretised ODE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill.conditioning import Conditioning
from distill.data.shards import ShardWriter
from distill.data.synthetic import caption, sample_labels
from distill.schedule import euler_sample
from distill.text import TextEncoder
from teachers.base import Denoiser


def teacher_trajectory(teacher: Denoiser, noise: Tensor, cond: Conditioning, guidance: float, teacher_steps: int,
                       student_steps: int) -> tuple[Tensor, Tensor]:
    """``(states [B, K, C, T, H, W], x0)``: the teacher's Euler trajectory at the K student times, and its end."""
    if teacher_steps % student_steps:
        raise ValueError(f"teacher_steps ({teacher_steps}) must be a multiple of student_steps ({student_steps}) so "
                         "that the student's times lie on the teacher's grid")
    stride, states, calls = teacher_steps // student_steps, [], [0]

    def recording(x: Tensor, t: Tensor) -> Tensor:
        if calls[0] % stride == 0:
            states.append(x)
        calls[0] += 1
        return teacher.guided(x, t, cond, guidance)

    with torch.no_grad():
        x0 = euler_sample(recording, noise, teacher.schedule, teacher_steps)
    return torch.stack(states, dim=1), x0


def write_ode_pairs(teacher: Denoiser, text_encoder: TextEncoder, out: str | Path, num: int,
                    shape: tuple[int, int, int, int], guidance: float, teacher_steps: int, student_steps: int,
                    batch_size: int = 16, seed: int = 0, negative_prompt: str = "", shard_size: int = 1000,
                    dtype: torch.dtype = torch.float32) -> Path:
    """``num`` ODE pairs for synthetic-domain captions (drawn from ``seed``) as shards under ``out``: tensors
    ``noise``, ``trajectory``, ``latents`` (the teacher's ``x0``), ``text_emb``, ``text_mask``."""
    device = next(teacher.parameters()).device
    negative, negative_mask = text_encoder.encode([negative_prompt])
    rng = np.random.default_rng([seed, 0xD15])
    with ShardWriter(out, max_samples_per_shard=shard_size) as writer, \
            tqdm(total=num, desc="ode pairs", unit="clip") as bar:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            labels = [sample_labels(rng) for _ in range(count)]
            captions = [caption(lab, rng) for lab in labels]
            text, mask = text_encoder.encode(captions)
            cond = Conditioning(text, mask, negative.expand(count, -1, -1), negative_mask.expand(count, -1)).to(device)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
            noise = torch.randn(count, *shape, generator=generator).to(device)
            states, x0 = teacher_trajectory(teacher, noise, cond, guidance, teacher_steps, student_steps)
            for i in range(count):
                writer.write({"key": f"{start + i:08d}", "caption": captions[i], "labels": labels[i],
                              "noise": noise[i].to(dtype).cpu(), "trajectory": states[i].to(dtype).cpu(),
                              "latents": x0[i].to(dtype).cpu(), "text_emb": text[i].to(dtype).cpu(),
                              "text_mask": mask[i].cpu()})
            bar.update(count)
    return Path(out)
