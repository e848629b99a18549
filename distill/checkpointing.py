"""Activation checkpointing that recomputes a block in the state of its forward.

Non-reentrant checkpointing (``torch.utils.checkpoint``) reruns a block during backward and requires the
rerun to save the same tensors as the forward. Two things can change in between: which parameters require
grad (DMD2's GAN generator term runs the critic with its parameters frozen, and they are unfrozen by the
time backward runs), and, in LoRA mode, which adapter the shared base has active. Both are restored here.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> Iterator[None]:
    before = [p.requires_grad for p, _ in flags]
    for p, flag in flags:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for (p, _), flag in zip(flags, before):
            p.requires_grad_(flag)


def checkpoint_block(block: nn.Module, *args, restore: Callable[[], ContextManager] | None = None):
    """``block(*args)`` with its activations recomputed in backward under the forward's ``requires_grad``
    flags and, when given, the context ``restore()`` makes (a diffusers ``gradient_checkpointing_func``)."""
    flags = [(p, p.requires_grad) for p in block.parameters()]

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:  # entered only when backward reruns the block
        with _requires_grad(flags), (restore() if restore is not None else contextlib.nullcontext()):
            yield

    return checkpoint(block.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), recompute()))
