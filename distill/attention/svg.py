"""Per-head pattern choice by online profiling, as in Sparse VideoGen (Xi et al. 2025, "Sparse VideoGen:
Accelerating Video Diffusion Transformers with Spatial-Temporal Sparsity"): for a few sampled queries, each
head's exact attention output is compared with its output under each candidate pattern, and the head keeps
the candidate with the smallest error. Training-free; done at every call, on the call's own q, k, v."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_queries(num_tokens: int, samples: int, valid: Tensor | None, device: torch.device) -> Tensor:
    """``samples`` real query positions, the same at every call (a fixed generator): recomputation under
    gradient checkpointing picks the same heads."""
    generator = torch.Generator().manual_seed(0)
    candidates = torch.arange(num_tokens) if valid is None else valid.cpu().nonzero().flatten()
    pick = torch.randperm(len(candidates), generator=generator)[:samples]
    return candidates[pick].to(device)


def choose_heads(q: Tensor, k: Tensor, v: Tensor, candidates: Tensor, block: int, key_valid: Tensor | None,
                 rows: Tensor, scale: float) -> Tensor:
    """``q, k, v`` ``[B, H, N, D]`` tile-major; ``candidates`` bool ``[C, Q, K]`` over blocks; ``rows`` the sampled
    query positions (:func:`sample_queries`, drawn once per layout by the caller: drawing them needs the host).

    Returns bool ``[H, Q, K]``: per head, the candidate whose output on the sampled queries is closest (mean
    squared error over batch, samples and channels) to dense attention.
    """
    with torch.no_grad():
        scores = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale  # [B, H, s, N]
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid.to(q.device), float("-inf"))
        exact = scores.softmax(-1) @ v.float()
        token_keep = candidates.to(q.device)[:, rows // block].repeat_interleave(block, -1)  # [C, s, N]
        errors = []
        for mask in token_keep:
            approx = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()
            errors.append((approx - exact).pow(2).mean(dim=(0, 2, 3)))  # [H]
        choice = torch.stack(errors).argmin(0)  # [H]
    return candidates.to(q.device)[choice]
