"""A block-sparse attention problem: which key blocks each query block keeps, per head, in the index layout
that kernels iterate (padded index + counts, as FlexAttention's BlockMask and VSA use), and its transpose
for the key/value gradient."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor


def keep_index(keep: Tensor, full_width: bool = False) -> tuple[Tensor, Tensor]:
    """``keep`` bool ``[H, Q, K]`` -> (indices int32 ``[H, Q, max_kept]`` of kept key blocks in ascending order,
    padded with 0, or ``[H, Q, K]`` with ``full_width`` as FlexAttention wants; counts int32 ``[H, Q]``)."""
    counts = keep.sum(-1, dtype=torch.int32)
    width = keep.shape[-1] if full_width else max(int(counts.max().item()), 1) if counts.numel() else 1
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    index = torch.where(torch.arange(width, device=keep.device) < counts[..., None], order, 0)
    return index.to(torch.int32).contiguous(), counts.contiguous()


class BlockSparse:
    """``keep`` bool ``[H or 1, Q, K]`` over blocks of ``block`` tokens; ``key_valid`` bool ``[K * block]`` marks
    real (not padding) keys, None when all are real. Index tensors are built once, on first use."""

    def __init__(self, keep: Tensor, block: int, key_valid: Tensor | None = None):
        if keep.ndim == 2:
            keep = keep[None]
        if keep.ndim != 3 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be bool [H, Q, K], got {keep.dtype} {tuple(keep.shape)}")
        if key_valid is not None and key_valid.shape != (keep.shape[2] * block,):
            raise ValueError(f"key_valid must be [{keep.shape[2] * block}], got {tuple(key_valid.shape)}")
        self.keep, self.block, self.key_valid = keep, block, key_valid

    @property
    def heads(self) -> int:
        return self.keep.shape[0]

    @property
    def density(self) -> float:
        return self.keep.float().mean().item()

    @cached_property
    def kv_index(self) -> tuple[Tensor, Tensor]:
        """Kept key blocks of each query block (forward and dq)."""
        return keep_index(self.keep)

    @cached_property
    def q_index(self) -> tuple[Tensor, Tensor]:
        """Query blocks that keep each key block (dk and dv)."""
        return keep_index(self.keep.transpose(1, 2))

    @cached_property
    def token_mask(self) -> Tensor:
        """Bool ``[H, N, N]``: the same pattern per token (the dense reference's mask)."""
        mask = self.keep.repeat_interleave(self.block, 1).repeat_interleave(self.block, 2)
        return mask if self.key_valid is None else mask & self.key_valid[None, None, :]

    @cached_property
    def key_bias(self) -> Tensor | None:
        """Float ``[K * block]``: 0 at real keys, -inf at padding (added to scores); None without padding."""
        if self.key_valid is None:
            return None
        return torch.zeros(self.key_valid.shape, device=self.key_valid.device).masked_fill(~self.key_valid,
                                                                                             float("-inf"))

    @cached_property
    def partial_blocks(self) -> Tensor | None:
        """Bool ``[K]``: key blocks holding padding (kernels mask inside them); None when there is none."""
        if self.key_valid is None:
            return None
        return ~self.key_valid.view(-1, self.block).all(-1)
