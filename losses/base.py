"""The Method protocol: a distillation or training objective, free of optimisers and devices."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from distill.conditioning import Batch
from teachers.base import Denoiser

Networks = dict[str, Denoiser]
Logs = dict[str, float]


class Method(Protocol):
    """``roles`` are the trainable networks in update order within one step (critics before the
    generator); ``loss`` returns the named network's loss on a batch, with every random draw taken
    from ``generator`` so that a step is reproducible from its seed."""

    roles: tuple[str, ...]

    def networks(self, model: Denoiser) -> tuple[Networks, Networks]:
        """``(trainable, frozen)`` networks built from the job's model (e.g. student and critic from a teacher)."""
        ...

    def describe(self) -> dict:
        """What an exported model needs to know of how it was trained (e.g. a student's step list)."""
        ...

    def loss(self, role: str, nets: Networks, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Logs]:
        ...
