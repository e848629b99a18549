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


TINY_DIR = Path(__file__).parent / "tiny"


def _tiny(source=None, schedule=None, dtype=torch.float32) -> Denoiser:
    """The teacher this project trains and ships (jobs/tiny_teacher.toml): Wan architecture, pixel space."""
    from teachers.wan import WanDenoiser

    path = Path(source or TINY_DIR)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the shipped tiny teacher is missing: no {path / 'config.json'}")
    return WanDenoiser.from_pretrained(path, schedule, dtype)


REGISTRY: dict[str, Loader] = {"wan": _wan, "tiny": _tiny}
SHIPPED = ("tiny",)  # names that load without a source


def register(name: str, loader: Loader) -> None:
    """Add a model family (its loader takes ``source, schedule=None, dtype=...``)."""
    REGISTRY[name] = loader


def load(name: str, source: str | Path | dict[str, Any] | None = None, schedule: Schedule | None = None,
         dtype: torch.dtype = torch.float32) -> Denoiser:
    """``teachers.load("tiny")``, ``teachers.load("wan", "wan2.1-t2v-1.3b")``,
    ``teachers.load("wan", "/models/Wan2.1-T2V-1.3B-Diffusers")``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown teacher family {name!r}; known: {sorted(REGISTRY)}")
    if source is None and name not in SHIPPED:
        raise ValueError(f"teacher family {name!r} needs a source: a preset, config or local directory")
    return REGISTRY[name](source, schedule=schedule, dtype=dtype)


def load_spec(spec: str, family: str = "wan", dtype: torch.dtype = torch.float32) -> Denoiser:
    """A command line's ``--teacher``: a shipped name (``tiny``) or a source of ``family``."""
    return load(spec, dtype=dtype) if spec in SHIPPED else load(family, spec, dtype=dtype)


__all__ = ["Denoiser", "REGISTRY", "SHIPPED", "load", "load_spec", "register"]
