"""Attention backends (dense SDPA, FlexAttention, the project's Triton block-sparse kernel) and sparse
patterns (sliding tile window, chunk-causal, both, Sparse VideoGen heads), installed into diffusers Wan
attention modules by name from a job's ``[attention]`` table."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from distill.attention.backends import BACKENDS, get_backend
from distill.attention.layout import TileLayout
from distill.attention.patterns import chunk_causal_frames, chunk_causal_tokens, sliding_tile
from distill.attention.processor import install, installed_spec, uninstall
from distill.attention.sparse import BlockSparse
from distill.attention.spec import AttentionSpec, load_spec, save_spec


def apply_to_roles(spec: AttentionSpec, networks: dict[str, nn.Module]) -> None:
    """Install ``spec`` into the job's networks named in ``spec.roles`` (a no-op for dense SDPA)."""
    missing = sorted(set(spec.roles) - set(networks))
    if missing:
        raise ValueError(f"attention.roles names {missing}, which this method does not have; "
                         f"its networks: {sorted(networks)}")
    if spec.active:
        for role in spec.roles:
            install(networks[role], spec)


def install_saved(model: nn.Module, model_dir: str | Path) -> nn.Module:
    """Re-install the pattern a saved model was trained with (``attention.json``); dense models are unchanged."""
    spec = load_spec(model_dir)
    return model if spec is None or not spec.active else install(model, spec)


__all__ = ["AttentionSpec", "BACKENDS", "BlockSparse", "TileLayout", "apply_to_roles", "chunk_causal_frames",
           "chunk_causal_tokens", "get_backend", "install", "install_saved", "installed_spec", "load_spec",
           "save_spec", "sliding_tile", "uninstall"]
