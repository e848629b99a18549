"""Teacher adapters: one Denoiser class per model family, and a registry to load them by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from distill.schedule import Schedule
from teachers.base import Denoiser

Loader = Callable[..., Denoiser]


def _wan(source, schedule=None, dtype=torch.float32) -> Denoiser:
    from teachers.wan import WanDenoiser

    return WanDenoiser.load(source, schedule, dtype)


REGISTRY: dict[str, Loader] = {"wan": _wan}


def register(name: str, loader: Loader) -> None:
    """Add a model family (its loader takes ``source, schedule=None, dtype=...``)."""
    REGISTRY[name] = loader


def load(name: str, source: str | Path | dict[str, Any], schedule: Schedule | None = None,
         dtype: torch.dtype = torch.float32) -> Denoiser:
    """``teachers.load("wan", "wan2.1-t2v-1.3b")``, ``teachers.load("wan", "/models/Wan2.1-T2V-1.3B-Diffusers")``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown teacher family {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](source, schedule=schedule, dtype=dtype)


__all__ = ["Denoiser", "REGISTRY", "load", "register"]
