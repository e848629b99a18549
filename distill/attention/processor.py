"""A diffusers attention processor for Wan self-attention that computes attention with a named backend and
pattern, and ``install`` to put it into a ``WanTransformer3DModel``.

Projections, RMS q/k norm and rotary embedding follow diffusers' ``WanAttnProcessor`` exactly (a test checks
the dense case against it); RoPE is applied in the model's token order, before the tile-major permutation,
so q, k and v are permuted consistently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.attention import patterns
from distill.attention.backends import get_backend
from distill.attention.layout import TileLayout
from distill.attention.sparse import BlockSparse
from distill.attention.spec import AttentionSpec
from distill.attention.svg import choose_heads, sample_queries


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding on ``[B, S, H, D]`` with interleaved channel pairs (tables ``[1, S, 1, D]``), as in
    diffusers' ``WanAttnProcessor``; also the causal students' (distill/causal.py)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated_half = torch.stack([-x2, x1], dim=-1).flatten(-2)  # (x1, x2) -> (-x2, x1) in every pair
    return torch.addcmul(x * cos, rotated_half, sin).type_as(x)  # the tables repeat each angle over its pair


def block_pattern(spec: AttentionSpec, layout: TileLayout, device: torch.device | str = "cpu") -> Tensor:
    """Bool ``[T, T]`` over tiles for the fixed patterns; ``[2, T, T]`` (spatial, temporal) candidates for svg."""
    if spec.pattern == "tile":
        return patterns.sliding_tile(layout.tiles, spec.window, device)
    if spec.pattern == "chunk_causal":
        return patterns.chunk_causal_tiles(layout, spec.chunk_frames, device)
    if spec.pattern == "tile_causal":
        return (patterns.sliding_tile(layout.tiles, spec.window, device)
                & patterns.chunk_causal_tiles(layout, spec.chunk_frames, device))
    if spec.pattern == "svg":
        return torch.stack([patterns.spatial_tiles(layout, spec.svg_frame_window, device),
                            patterns.temporal_tiles(layout, spec.svg_spatial_window, device)])
    raise ValueError(f"no block pattern for attention.pattern = {spec.pattern!r}")


class GridContext:
    """Shared by one model's processors: the latent-patch grid of the current forward (set by a pre-hook on
    the transformer, since processors only see flat tokens) and the patterns built for each grid."""

    def __init__(self, spec: AttentionSpec, patch_size: tuple[int, int, int]):
        self.spec, self.patch_size = spec, tuple(patch_size)
        self.grid: tuple[int, int, int] | None = None
        self._patterns: dict[tuple, tuple[TileLayout, Tensor, BlockSparse | None]] = {}
        self._svg_queries: dict[tuple, tuple[Tensor | None, Tensor]] = {}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.grid = tuple(n // p for n, p in zip(x.shape[2:], self.patch_size))

    def pattern(self, device: torch.device) -> tuple[TileLayout, Tensor, BlockSparse | None]:
        """For the current grid, built once per grid: the layout, the block keep mask (svg: its candidates) and
        the fixed pattern's BlockSparse (its index is then built once too; None for svg)."""
        if self.grid is None:
            raise RuntimeError("sparse attention processor called outside its transformer's forward (no grid)")
        key = (self.grid, str(device))
        if key not in self._patterns:
            layout = TileLayout(self.grid, tuple(self.spec.tile))
            keep = block_pattern(self.spec, layout, device)
            fixed = None if self.spec.pattern == "svg" else BlockSparse(keep, layout.block, layout.key_valid(device))
            self._patterns[key] = (layout, keep, fixed)
        return self._patterns[key]

    def svg_pattern(self, q: Tensor, k: Tensor, v: Tensor, layout: TileLayout, candidates: Tensor,
                    scale: float) -> BlockSparse:
        """Sparse VideoGen: per head, the candidate that best matches this call's tile-major q, k, v. The real-key
        mask and the sampled queries are made once per grid, not at every layer of every forward."""
        key = (self.grid, str(q.device))
        if key not in self._svg_queries:
            key_valid = layout.key_valid(q.device)
            self._svg_queries[key] = key_valid, sample_queries(q.shape[2], self.spec.svg_samples, key_valid, q.device)
        key_valid, rows = self._svg_queries[key]
        keep = choose_heads(q, k, v, candidates, layout.block, key_valid, rows, scale)
        return BlockSparse(keep, layout.block, key_valid)


class SparseWanAttnProcessor:
    """Self-attention of a ``WanAttention`` through ``distill.attention`` backends and patterns."""

    def __init__(self, context: GridContext):
        self.context = context
        self.backend = get_backend(context.spec.backend)

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SparseWanAttnProcessor is for self-attention only (no encoder states, no mask)")
        if getattr(attn, "fused_projections", False):
            raise ValueError("SparseWanAttnProcessor needs unfused q/k/v projections")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        out = self.attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``[B, S, H, D]`` in model order -> attention output ``[B, S, H, D]``."""
        scale = q.shape[-1] ** -0.5
        if self.context.spec.pattern == "dense":
            heads_first = [x.transpose(1, 2) for x in (q, k, v)]
            return self.backend(*heads_first, None, scale).transpose(1, 2)
        layout, keep, sparse = self.context.pattern(q.device)
        qt, kt, vt = (layout.to_tiles(x).transpose(1, 2) for x in (q, k, v))
        if sparse is None:
            sparse = self.context.svg_pattern(qt, kt, vt, layout, keep, scale)
        return layout.from_tiles(self.backend(qt, kt, vt, sparse, scale).transpose(1, 2))


def _transformer(model: nn.Module) -> nn.Module:
    transformer = getattr(model, "transformer", model)
    if not hasattr(transformer, "blocks") or not all(hasattr(b, "attn1") for b in transformer.blocks):
        raise TypeError(f"{type(transformer).__name__} is not a WanTransformer3DModel (blocks with attn1)")
    return transformer


def install(model: nn.Module, spec: AttentionSpec) -> nn.Module:
    """Put ``spec``'s processor into every self-attention of a Wan transformer (or a Denoiser wrapping one).
    Cross-attention keeps diffusers' processor. Installing again replaces the previous one."""
    spec.validate()
    transformer = _transformer(model)
    uninstall(model)
    context = GridContext(spec, transformer.config.patch_size)
    for block in transformer.blocks:
        block.attn1.set_processor(SparseWanAttnProcessor(context))
    handle = transformer.register_forward_pre_hook(context.hook, with_kwargs=True)
    transformer._distill_attention = (spec, handle)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Restore diffusers' own processor."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    transformer = _transformer(model)
    installed = getattr(transformer, "_distill_attention", None)
    if installed is not None:
        installed[1].remove()
        del transformer._distill_attention
        for block in transformer.blocks:
            block.attn1.set_processor(WanAttnProcessor())
    return model


def installed_spec(model: nn.Module) -> AttentionSpec | None:
    installed = getattr(_transformer(model), "_distill_attention", None)
    return None if installed is None else installed[0]
