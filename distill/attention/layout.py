"""Tile-major token order: the tokens of one (frames x rows x columns) tile of the latent-patch grid are
contiguous, so a tile is one kernel block (Sliding Tile Attention, Zhang et al. 2025; VSA).

Grids whose sides are not multiples of the tile are zero-padded; ``key_valid`` marks the real tokens so that
padded keys are masked out and padded queries dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class TileLayout:
    grid: tuple[int, int, int]  # tokens along (frames, rows, columns)
    tile: tuple[int, int, int]

    def __post_init__(self):
        if len(self.grid) != 3 or len(self.tile) != 3 or min(self.grid) < 1 or min(self.tile) < 1:
            raise ValueError(f"TileLayout needs a 3-D grid and tile of positive sizes, got {self.grid}, {self.tile}")

    @property
    def tiles(self) -> tuple[int, int, int]:
        """Tiles along each axis (the last one of an axis may be partly padding)."""
        return tuple(math.ceil(g / t) for g, t in zip(self.grid, self.tile))

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tiles)

    @property
    def block(self) -> int:
        return math.prod(self.tile)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def padded_tokens(self) -> int:
        return self.num_tiles * self.block

    @property
    def padded(self) -> bool:
        return self.padded_tokens != self.tokens

    def to_tiles(self, x: Tensor) -> Tensor:
        """``[B, S, ...]`` in the model's (frame, row, column) order -> ``[B, padded_tokens, ...]`` tile-major."""
        if x.shape[1] != self.tokens:
            raise ValueError(f"tensor with {x.shape[1]} tokens does not fit the grid {self.grid} ({self.tokens})")
        b, rest = x.shape[0], x.shape[2:]
        x = x.reshape(b, *self.grid, -1)
        pads = []
        for g, t in zip(reversed(self.grid), reversed(self.tile)):
            pads += [0, -g % t]
        x = F.pad(x, [0, 0, *pads]) if self.padded else x
        (nf, nh, nw), (tf, th, tw) = self.tiles, self.tile
        x = x.reshape(b, nf, tf, nh, th, nw, tw, -1).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, self.padded_tokens, *rest)

    def from_tiles(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`to_tiles`: padding dropped, model order restored."""
        b, rest = x.shape[0], x.shape[2:]
        (nf, nh, nw), (tf, th, tw) = self.tiles, self.tile
        x = x.reshape(b, nf, nh, nw, tf, th, tw, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
        x = x.reshape(b, nf * tf, nh * th, nw * tw, -1)[:, :self.grid[0], :self.grid[1], :self.grid[2]]
        return x.reshape(b, self.tokens, *rest)

    def key_valid(self, device: torch.device | str = "cpu") -> Tensor | None:
        """Bool ``[padded_tokens]``: True at real tokens; None when there is no padding."""
        if not self.padded:
            return None
        return self.to_tiles(torch.ones(1, self.tokens, dtype=torch.bool, device=device))[0]

    def tile_coords(self, device: torch.device | str = "cpu") -> Tensor:
        """Long ``[num_tiles, 3]``: each tile's (frame, row, column) tile index, in tile-major order."""
        axes = [torch.arange(n, device=device) for n in self.tiles]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
