"""Attention backends: ``fn(q, k, v, sparse, scale) -> out`` on ``[B, H, N, D]`` tensors in tile-major order.

``sparse`` is a :class:`BlockSparse` (or None for dense attention). Every backend computes the same function
(softmax over the kept, real keys) and has a backward pass, so they are interchangeable in training.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.attention.sparse import BlockSparse, keep_index

Backend = Callable[[Tensor, Tensor, Tensor, "BlockSparse | None", float], Tensor]


def sdpa(q: Tensor, k: Tensor, v: Tensor, sparse: BlockSparse | None, scale: float) -> Tensor:
    """Dense SDPA; with a pattern, SDPA under the pattern's token mask (the reference every backend is
    checked against; memory grows with N^2, so it is for small sizes and CPU)."""
    mask = None if sparse is None else sparse.token_mask.to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


_compiled_flex = None


def flex_attention_for(device: torch.device):
    """FlexAttention, compiled once per process on CUDA (eager on CPU: an unfused reference); the sparse
    backends and the causal students' block-causal training share it."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_block_mask(sparse: BlockSparse, device: torch.device):
    """The pattern as FlexAttention's BlockMask, built from the index directly, once per pattern: blocks without
    padding are "full" (no mask_mod on the fused path), blocks with padded keys are partial. The mask_mod
    states the whole pattern, as FlexAttention's contract asks (its unfused CPU path reads only the mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    cached = getattr(sparse, "_flex_mask", None)
    if cached is not None and cached[0] == device:
        return cached[1]
    keep, block = sparse.keep.to(device), sparse.block
    partial = (sparse.partial_blocks.to(device) if sparse.partial_blocks is not None
               else torch.zeros(keep.shape[2], dtype=torch.bool, device=device))
    part_idx, part_cnt = keep_index(keep & partial[None, None, :], full_width=True)
    full_idx, full_cnt = keep_index(keep & ~partial[None, None, :], full_width=True)
    valid = sparse.key_valid.to(device) if sparse.key_valid is not None else None
    shared = keep.shape[0] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        kept = keep[0 if shared else h, q_idx // block, kv_idx // block]
        return kept if valid is None else kept & valid[kv_idx]

    mask = BlockMask.from_kv_blocks(part_cnt[None], part_idx[None], full_cnt[None], full_idx[None],
                                    BLOCK_SIZE=block, mask_mod=mask_mod)
    sparse._flex_mask = (device, mask)
    return mask


def flex(q: Tensor, k: Tensor, v: Tensor, sparse: BlockSparse | None, scale: float) -> Tensor:
    """FlexAttention (Dong et al. 2024) with a block mask. FlexAttention has no CPU backward, so CPU training
    falls back to the SDPA reference (the same function)."""
    if q.device.type == "cpu" and any(x.requires_grad for x in (q, k, v)):
        return sdpa(q, k, v, sparse, scale)
    mask = None if sparse is None else flex_block_mask(sparse, q.device)
    return flex_attention_for(q.device)(q, k, v, block_mask=mask, scale=scale)


def triton(q: Tensor, k: Tensor, v: Tensor, sparse: BlockSparse | None, scale: float) -> Tensor:
    """The project's Triton block-sparse kernel on CUDA; the SDPA reference elsewhere (and for dense)."""
    from distill.attention import triton_kernel

    if sparse is None or not triton_kernel.runs_on(q):
        return sdpa(q, k, v, sparse, scale)
    return triton_kernel.block_sparse_attention(q, k, v, sparse, scale)


BACKENDS: dict[str, Backend] = {"sdpa": sdpa, "flex": flex, "triton": triton}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]
