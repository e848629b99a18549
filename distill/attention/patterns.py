"""Attention patterns as pure functions: boolean keep-masks over tiles (query tile x key tile) or frames.

- Sliding tile window: Sliding Tile Attention (Zhang et al. 2025, "Fast Video Generation with Sliding Tile
  Attention"): each query tile sees a window of tiles around it, the window shifted inward at the borders so
  every query sees the same number of tiles.
- Chunk-causal: a query frame sees every frame of its own chunk and of earlier chunks (CausVid, Yin et al.
  2025; Self Forcing, Huang et al. 2025): the training mask of a chunk-by-chunk causal student.
- Spatial / temporal heads: Sparse VideoGen (Xi et al. 2025): spatial heads look within nearby frames,
  temporal heads at the same place across all frames.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.attention.layout import TileLayout


def window_keep(n: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``[n, n]``: along one axis of ``n`` tiles, the ``w`` tiles query ``i`` keeps (centred, shifted
    inward at the borders; everything when ``w >= n``)."""
    pos = torch.arange(n, device=device)
    start = (pos - w // 2).clamp(min=0, max=max(n - w, 0))
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + w)


def sliding_tile(tiles: tuple[int, int, int], window: tuple[int, int, int] | list[int],
                 device: torch.device | str = "cpu") -> Tensor:
    """Bool ``[T, T]`` over tiles in tile-major order (``T = prod(tiles)``): the 3-D sliding tile window."""
    f, h, w = (window_keep(n, win, device) for n, win in zip(tiles, window))
    keep = f[:, None, None, :, None, None] & h[None, :, None, None, :, None] & w[None, None, :, None, None, :]
    total = tiles[0] * tiles[1] * tiles[2]
    return keep.reshape(total, total)


def chunk_causal_frames(num_frames: int, chunk_frames: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``[F, F]``: query frame ``i`` keeps key frame ``j`` when ``j``'s chunk is not after ``i``'s."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    chunk = torch.arange(num_frames, device=device) // chunk_frames
    return chunk[None, :] <= chunk[:, None]


def chunk_causal_tokens(grid: tuple[int, int, int], chunk_frames: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``[S, S]`` over tokens in the model's (frame, row, column) order: the chunk-causal training mask
    of a causal student (``True`` = attend)."""
    per_frame = grid[1] * grid[2]
    frames = chunk_causal_frames(grid[0], chunk_frames, device)
    return frames.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)


def chunk_causal_tiles(layout: TileLayout, chunk_frames: int, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``[T, T]`` over tiles: the chunk-causal mask at tile granularity (exact when the tile's frame
    count divides ``chunk_frames``)."""
    if chunk_frames % layout.tile[0]:
        raise ValueError(f"chunk_frames {chunk_frames} is not a multiple of the tile's frames {layout.tile[0]}")
    first_frame = layout.tile_coords(device)[:, 0] * layout.tile[0]
    chunk = first_frame // chunk_frames
    return chunk[None, :] <= chunk[:, None]


def spatial_tiles(layout: TileLayout, frame_window: int, device: torch.device | str = "cpu") -> Tensor:
    """Sparse VideoGen's spatial head at tile granularity: all tiles of the ``frame_window`` nearest frame tiles."""
    nf, nh, nw = layout.tiles
    return sliding_tile(layout.tiles, (frame_window, nh, nw), device)


def temporal_tiles(layout: TileLayout, spatial_window: tuple[int, int] | list[int],
                   device: torch.device | str = "cpu") -> Tensor:
    """Sparse VideoGen's temporal head at tile granularity: the same place (a ``spatial_window`` of tiles) in
    every frame."""
    return sliding_tile(layout.tiles, (layout.tiles[0], *spatial_window), device)


def density(keep: Tensor) -> float:
    """Fraction of kept (query tile, key tile) pairs."""
    return keep.float().mean().item()
