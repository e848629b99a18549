"""The job file's ``[attention]`` table: which backend computes self-attention and which pattern it keeps.

Import-light (no torch) so that ``distill.config`` can embed it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

BACKEND_NAMES = ("sdpa", "flex", "triton")
PATTERN_NAMES = ("dense", "tile", "chunk_causal", "tile_causal", "svg")
SAVED_NAME = "attention.json"  # written next to an exported model that was trained with a sparse pattern


@dataclass
class AttentionSpec:
    """Self-attention of the networks in ``roles``.

    ``pattern``: ``dense``; ``tile`` (3-D sliding tile window, ``window`` tiles per axis, Sliding Tile
    Attention); ``chunk_causal`` (a query frame sees its own chunk of ``chunk_frames`` latent frames and
    earlier ones); ``tile_causal`` (both); ``svg`` (per head, the spatial or temporal pattern with the smaller
    error on sampled queries, Sparse VideoGen). ``tile`` is the tile in tokens (frames, rows, columns) of
    the latent-patch grid: one tile is one kernel block, so its volume must be a power of two >= 16.
    """

    backend: str = "sdpa"  # "sdpa", "flex" or "triton"
    pattern: str = "dense"
    tile: list[int] = field(default_factory=lambda: [1, 4, 4])
    window: list[int] = field(default_factory=lambda: [3, 3, 3])  # in tiles, per axis (frames, rows, columns)
    chunk_frames: int = 0  # latent frames per causal chunk
    svg_frame_window: int = 1  # spatial heads: tiles along time (1 = the query's own frame tile)
    svg_spatial_window: list[int] = field(default_factory=lambda: [1, 1])  # temporal heads: tiles along rows/columns
    svg_samples: int = 64  # query tokens sampled per head to choose its pattern
    roles: list[str] = field(default_factory=lambda: ["generator"])

    @property
    def active(self) -> bool:
        """Whether anything other than the stock dense processor is asked for."""
        return self.pattern != "dense" or self.backend != "sdpa"

    @property
    def block(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]

    def problems(self) -> list[str]:
        """What is wrong with the settings, each naming its key (empty when valid)."""
        out = []
        if self.backend not in BACKEND_NAMES:
            out.append(f"attention.backend = {self.backend!r}; expected one of {list(BACKEND_NAMES)}")
        if self.pattern not in PATTERN_NAMES:
            out.append(f"attention.pattern = {self.pattern!r}; expected one of {list(PATTERN_NAMES)}")
        for key, n in (("tile", 3), ("window", 3), ("svg_spatial_window", 2)):
            value = getattr(self, key)
            if len(value) != n or min(value) < 1:
                out.append(f"attention.{key} = {value}; expected {n} positive integers")
        if not out and (self.block < 16 or self.block & (self.block - 1)):
            out.append(f"attention.tile = {self.tile}: its volume {self.block} must be a power of two >= 16 "
                       "(one tile is one kernel block)")
        if self.pattern in ("chunk_causal", "tile_causal"):
            if self.chunk_frames < 1:
                out.append(f"attention.pattern = {self.pattern!r} needs attention.chunk_frames >= 1")
            elif self.chunk_frames % self.tile[0]:
                out.append(f"attention.chunk_frames = {self.chunk_frames} must be a multiple of the tile's frames "
                           f"{self.tile[0]} (a tile may not straddle two chunks)")
        if self.svg_frame_window < 1 or self.svg_samples < 1:
            out.append("attention.svg_frame_window and attention.svg_samples must be >= 1")
        if not self.roles:
            out.append("attention.roles must name at least one network role (e.g. 'generator')")
        return out

    def validate(self) -> "AttentionSpec":
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, table: dict) -> "AttentionSpec":
        unknown = set(table) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"attention settings: unknown key(s) {sorted(unknown)}")
        return cls(**table).validate()


def save_spec(spec: AttentionSpec, model_dir: str | Path) -> Path:
    """Record the pattern a model was trained with beside its weights (loaders re-install it)."""
    path = Path(model_dir) / SAVED_NAME
    path.write_text(json.dumps(spec.to_dict(), indent=1))
    return path


def load_spec(model_dir: str | Path) -> AttentionSpec | None:
    """The saved spec of a model directory, or None for dense models."""
    path = Path(model_dir) / SAVED_NAME
    if not path.is_file():
        return None
    try:
        return AttentionSpec.from_dict(json.loads(path.read_text()))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
