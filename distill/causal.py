"""Chunk-causal Wan students: block-masked training over whole clips, KV-cached streaming at inference.

A causal student (CausVid, Yin et al. 2025; Self-Forcing, Huang et al. 2025) splits the latent frames into
chunks of ``chunk_frames``; every token of a chunk attends to its own chunk and to all earlier chunks. The same
weights run two ways, chosen per call by :class:`CausalWanDenoiser`:

- **mask mode** (no cache): the whole clip in one forward with a block-causal mask (FlexAttention on CUDA,
  masked SDPA elsewhere). Per-chunk times ``[B, T]`` give diffusion forcing.
- **cache mode**: one chunk per forward. Each layer's self-attention reads the keys/values of earlier chunks
  from a :class:`KVCache`; after a chunk is denoised, its clean ``x0`` is run once more at ``t = 0``
  (:meth:`CausalWanDenoiser.write_cache`) to put its keys/values in the cache (as both papers do), or re-noised to
  a small level (``context_noise``) so that the next chunks do not copy its residual noise.

Positions (Wan's 3-D RoPE). Keys are cached *before* RoPE, and RoPE is applied at attention time with
positions inside the cache window: cached frames sit at ``0 .. n-1`` in cache order and the current chunk at
``n .. n+c-1``. Until the window is full these are the absolute frame positions, so streaming equals the
whole-clip masked forward exactly. Once it rolls (the oldest non-sink frames are evicted), every query still
sees keys at the same relative offsets it saw in training (at most ``cache_frames + chunk_frames - 1``), and
sink frames keep positions ``0 .. s-1`` just before the rest of the window: the cache-relative positions of
StreamingLLM (Xiao et al. 2024), which keeps all RoPE angles in the trained range however long the video
runs. Absolute positions would instead push query/sink distances past anything seen in training and past
the RoPE table (``rope_max_seq_len``). The cost is re-rotating the cached keys once per chunk after an
eviction (:class:`KVCache` keeps them pre-RoPE and rotated), an elementwise pass small next to attention.
Re-rotation fixes RoPE only: a rolled key keeps what its write computed from the frame's old place (the frame
coordinate channels, and in deeper layers the evicted context). ``reencode`` windows (:class:`KVCache`) write the
kept frames again instead, so every chunk sees what the opening of a training clip gives it.

Speed. Everything in cache mode that depends on how full the window is (key length, positions, the cache's
bookkeeping) happens in one eager function per layer (:func:`_attend_cache`); the rest of a block sees the same
shapes at every chunk and every layer, so ``torch.compile``'d blocks (:meth:`WanDenoiser.compile_blocks`) share
one set of static-shape graphs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from torch import Tensor

from distill.attention.backends import flex_attention_for
from distill.attention.patterns import chunk_causal_tokens
from distill.attention.processor import apply_rotary
from distill.conditioning import Conditioning
from distill.config import cache_window, check_reencode
from distill.schedule import Schedule, TimeLike, device_times
from distill.students import make_student, noise_like
from teachers.wan import WanDenoiser


def chunk_ids(frames: int, tokens_per_frame: int, chunk_frames: int, device: torch.device | None = None) -> Tensor:
    """The chunk index of every token of a ``frames``-frame clip (frame-major token order)."""
    return torch.arange(frames, device=device).div(chunk_frames, rounding_mode="floor").repeat_interleave(
        tokens_per_frame)


@functools.lru_cache(maxsize=16)
def block_causal_mask(frames: int, tokens_per_frame: int, chunk_frames: int, device=None) -> Tensor:
    """Boolean ``[S, S]`` (True = attend): a query's chunk is at or after the key's chunk. Cached per layout, as
    every layer of a forward asks for the same one."""
    return chunk_causal_tokens((frames, 1, tokens_per_frame), chunk_frames, device or "cpu")


@functools.lru_cache(maxsize=16)
def _flex_block_mask(frames: int, tokens_per_frame: int, chunk_frames: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    ids = chunk_ids(frames, tokens_per_frame, chunk_frames, device)
    return create_block_mask(lambda b, h, q, k: ids[q] >= ids[k], B=None, H=None, Q_LEN=ids.numel(),
                             KV_LEN=ids.numel(), device=device)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, frames: int, tokens_per_frame: int, chunk_frames: int) -> Tensor:
    """Block-causal FlexAttention on ``[B, H, S, D]``; the block mask is built once per layout."""
    mask = _flex_block_mask(frames, tokens_per_frame, chunk_frames, q.device)
    return flex_attention_for(q.device)(q, k, v, block_mask=mask)


class KVCache:
    """Static per-layer key/value buffers (cache order) for a window of ``capacity`` context frames plus the chunk
    being generated.

    ``frames`` counts the valid frames. Before each chunk the oldest frames after the ``sinks`` first ones are
    evicted until at most ``capacity`` remain (a rolling window), so every chunk attends to at most ``capacity``
    earlier frames. Keys are kept twice: before RoPE (``k``, the source of truth) and rotated at their current
    window positions (``k_rot``, what attention reads). Positions change only when frames are evicted, so the
    window is re-rotated once per chunk after an eviction, not at every step. The buffers are allocated once:
    memory stays flat however many chunks are streamed. Bookkeeping is Python ints: nothing waits on the device.

    ``reencode`` > 0 replaces the rolling window by restarts: once a chunk would not fit, every frame after the
    sinks is dropped and the last ``reencode`` frames are written again from the window position after the sinks
    (:meth:`CausalWanDenoiser.forward`), from the inputs their first writes recorded, so that the window is again
    what the opening of a training clip gives (as CausVid recomputes the KV cache of a sliding window). A restart
    costs ``reencode / chunk_frames`` writes.
    """

    def __init__(self, layers: int, batch: int, tokens_per_frame: int, capacity: int, chunk_frames: int,
                 heads: int, head_dim: int, sinks: int = 0, reencode: int = 0, device=None,
                 dtype: torch.dtype = torch.float32):
        if capacity < sinks + chunk_frames:
            raise ValueError(f"a KV cache window of {capacity} frames must hold its {sinks} sink frames and at least "
                             f"one chunk of {chunk_frames} recent frames")
        check_reencode(reencode, capacity, chunk_frames, sinks)
        shape = (layers, batch, (capacity + chunk_frames) * tokens_per_frame, heads, head_dim)
        self.k, self.k_rot, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(3))
        self.capacity, self.chunk_frames, self.sinks = capacity, chunk_frames, sinks
        self.tokens_per_frame = tokens_per_frame
        self.frames = 0  # valid frames in the buffers
        self.seen = 0  # frames ever written
        self.rotated = [0] * layers  # per layer: leading frames whose k_rot matches their current positions
        self.rope: tuple | None = None  # ((height, width), (cos, sin)) for window positions, set by the model
        self.reencode = reencode
        self.written: list[tuple[Tensor, Tensor, Conditioning]] = []  # the last writes' inputs, for re-encoding

    @property
    def layers(self) -> int:
        return len(self.rotated)

    def reset(self) -> None:
        self.frames = self.seen = 0
        self.rotated = [0] * self.layers
        self.written = []

    def record(self, x: Tensor, t: Tensor, cond: Conditioning) -> None:
        """Count a new chunk's write, keeping its inputs where re-encoding needs them (the last ``reencode``
        frames' worth)."""
        self.seen += x.shape[2]
        if self.reencode:
            self.written = (self.written + [(x, t, cond)])[-(self.reencode // self.chunk_frames):]

    def restart(self) -> list[tuple[Tensor, Tensor, Conditioning]]:
        """Re-encoding: drop every frame after the sinks; returns the writes to make again, oldest first."""
        replay = self.written
        self.frames = min(self.frames, self.sinks)
        self.rotated = [min(r, self.sinks) for r in self.rotated]
        return replay

    @property
    def must_restart(self) -> bool:
        """Whether the next chunk re-encodes the window (it would not fit)."""
        return bool(self.reencode) and self.frames > self.capacity

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.k, self.k_rot, self.v))

    def window(self, layer: int, extra_tokens: int) -> tuple[Tensor, Tensor]:
        """Views of the valid (pre-RoPE) keys and values of ``layer`` and the next ``extra_tokens`` slots."""
        n = self.frames * self.tokens_per_frame + extra_tokens
        return self.k[layer, :, :n], self.v[layer, :, :n]

    def make_room(self) -> None:
        """Evict the oldest non-sink frames beyond the window (all layers at once)."""
        evict = self.frames - self.capacity
        if evict <= 0:
            return
        L = self.tokens_per_frame
        start, keep_from, end = self.sinks * L, (self.sinks + evict) * L, self.frames * L
        for buffer in (self.k, self.v):
            buffer[:, :, start:end - evict * L] = buffer[:, :, keep_from:end].clone()
        self.frames -= evict
        self.rotated = [min(r, self.sinks) for r in self.rotated]  # the moved frames have new positions

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Put a chunk's keys/values in the slots after the valid frames (counted only after :meth:`commit`)."""
        start = self.frames * self.tokens_per_frame
        self.k[layer, :, start:start + k.shape[1]] = k
        self.v[layer, :, start:start + v.shape[1]] = v

    def attend(self, layer: int, k: Tensor, k_rot: Tensor, v: Tensor, cos: Tensor,
               sin: Tensor) -> tuple[Tensor, Tensor]:
        """Inference: write a chunk's keys (before RoPE and rotated at its window positions) and values after the
        valid frames and return the rotated keys and the values of the window and the chunk (positions
        ``0 .. n + s - 1``), re-rotating (with the window tables ``cos``, ``sin``) only keys that eviction moved."""
        L, n, s = self.tokens_per_frame, self.frames * self.tokens_per_frame, k.shape[1]
        self.write(layer, k, v)
        self.k_rot[layer, :, n:n + s] = k_rot
        done = self.rotated[layer] * L
        if done < n:
            self.k_rot[layer, :, done:n] = apply_rotary(self.k[layer, :, done:n], cos[:, done:n], sin[:, done:n])
            self.rotated[layer] = self.frames
        return self.k_rot[layer, :, :n + s], self.v[layer, :, :n + s]

    def commit(self, frames: int) -> None:
        self.rotated = [r + frames if r == self.frames else r for r in self.rotated]  # written at their positions
        self.frames += frames


class _CacheWritten(Exception):
    """Ends a cache-writing forward once the last layer has written its keys and values: its attention and
    everything after it (the prediction) would be computed for nobody."""


@dataclass
class _CallState:
    """What the processor needs to know about the forward in progress."""

    frames: int = 0
    tokens_per_frame: int = 0
    cache: KVCache | None = None
    write_only: bool = False  # a cache-writing forward (stops after the last layer's keys and values)
    layer: int = 0  # cache mode: the layer that attends next (blocks run in order)
    rope: tuple[Tensor, Tensor] | None = None  # cache mode: tables for window positions 0 .. capacity + chunk
    chunk_rope: tuple[Tensor, Tensor] | None = None  # cache mode: the tables at the chunk's window positions


@torch.compiler.disable
def _attend_cache(state: _CallState, query: Tensor, key: Tensor, rotated: Tensor, value: Tensor) -> Tensor:
    """Cache-mode self-attention of the next layer on ``[B, S, H, D]`` projections (query and ``rotated`` key at
    the chunk's window positions, ``key`` before RoPE), returning ``[B, H, S, D]``. Eager under ``torch.compile``:
    the key length and the layer index change with the window's fill and from layer to layer, and would otherwise
    specialise (and recompile) the compiled blocks."""
    cache, layer = state.cache, state.layer
    state.layer += 1
    if torch.is_grad_enabled():  # self-forcing training: keep the static buffers out of the autograd graph
        cached_k, cached_v = cache.window(layer, 0)
        n, (cos, sin) = cached_k.shape[1], state.rope
        keys = torch.cat([apply_rotary(cached_k, cos[:, :n], sin[:, :n]), rotated], dim=1)
        values = torch.cat([cached_v, value], dim=1)
    else:  # the chunk goes in the slots after the valid frames; only write_cache commits it
        keys, values = cache.attend(layer, key, rotated, value, *state.rope)
        if state.write_only and layer == cache.layers - 1:
            raise _CacheWritten
    return F.scaled_dot_product_attention(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))


class ChunkCausalProcessor:
    """Self-attention of the Wan blocks with chunk-causal masking (mask mode) or a KV cache (cache mode). One
    instance serves every block (cache mode counts layers in the call state), so compiled blocks share graphs."""

    def __init__(self, state: _CallState, chunk_frames: int, backend: str = "auto"):
        self.state, self.chunk_frames, self.backend = state, chunk_frames, backend

    def _use_flex(self, q: Tensor) -> bool:
        return self.backend == "flex" or (self.backend == "auto" and q.is_cuda)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        state = self.state
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb if state.cache is None else state.chunk_rope
        query, rotated = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if state.cache is None:
            q, k, v = (x.transpose(1, 2) for x in (query, rotated, value))
            if self._use_flex(q):
                out = _flex_attention(q, k, v, state.frames, state.tokens_per_frame, self.chunk_frames)
            else:
                mask = block_causal_mask(state.frames, state.tokens_per_frame, self.chunk_frames, q.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = _attend_cache(state, query, key, rotated, value)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class CausalWanDenoiser(WanDenoiser):
    """A Wan denoiser whose self-attention is chunk-causal. The weights (and ``state_dict``) are the teacher's;
    only the attention processors differ, so a checkpoint loads into either."""

    def __init__(self, transformer, schedule: Schedule | None = None, chunk_frames: int = 1, backend: str = "auto",
                 coordinate_frames: int = 0, offset_frames: int = 0):
        super().__init__(transformer, schedule, coordinate_frames, offset_frames)
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        if transformer.config.patch_size[0] != 1:
            raise ValueError("chunk-causal attention needs a temporal patch size of 1")
        self.chunk_frames = chunk_frames
        self._state = _CallState()
        processor = ChunkCausalProcessor(self._state, chunk_frames, backend)
        for block in transformer.blocks:
            block.attn1.set_processor(processor)

    @classmethod
    def from_bidirectional(cls, model: WanDenoiser, chunk_frames: int, backend: str = "auto") -> "CausalWanDenoiser":
        """The causal twin of ``model``, sharing its transformer (copy ``model`` first to keep it bidirectional)."""
        return cls(model.transformer, model.schedule, chunk_frames, backend, model.coordinate_frames,
                   model.offset_frames)

    def _tokens_per_frame(self, x: Tensor) -> int:
        _, p_h, p_w = self.config.patch_size
        return (x.shape[3] // p_h) * (x.shape[4] // p_w)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, cache: KVCache | None = None, **kwargs) -> Tensor:
        """Mask mode over the whole clip when ``cache`` is None; else one chunk against ``cache`` (which it reads
        but does not extend: :meth:`write_cache` does). In cache mode the chunk's frame coordinate (models with
        coordinate channels) starts at its window position, as its RoPE positions do, so that streaming equals the
        whole clip until the window rolls and stays within the trained range after."""
        state, tokens_per_frame = self._state, self._tokens_per_frame(x_t)
        if cache is None:
            state.frames, state.tokens_per_frame = x_t.shape[2], tokens_per_frame
            return super().forward(x_t, t, cond, **kwargs)
        if x_t.shape[2] > self.chunk_frames:
            raise ValueError(f"cache mode takes one chunk of <= {self.chunk_frames} frames, got {x_t.shape[2]}")
        if cache.tokens_per_frame != tokens_per_frame:
            raise ValueError(f"KV cache is for {cache.tokens_per_frame} tokens per frame, latents have "
                             f"{tokens_per_frame}")
        if torch.is_grad_enabled() and self.transformer.gradient_checkpointing:
            raise ValueError("cache mode cannot recompute under gradient checkpointing (the cache changes before "
                             "the backward pass); disable model.gradient_checkpointing for KV-cached training")
        self._make_room(cache)  # before a chunk's first step, so that its steps and its write see one window
        state.frames, state.tokens_per_frame = x_t.shape[2], tokens_per_frame  # after any replayed writes
        cos, sin = self._window_rope(cache, x_t)
        n, s = cache.frames * cache.tokens_per_frame, x_t.shape[2] * cache.tokens_per_frame
        state.cache, state.layer, state.rope = cache, 0, (cos, sin)
        state.chunk_rope = cos[:, n:n + s], sin[:, n:n + s]  # the chunk is rotated inside the compiled blocks
        try:
            return super().forward(x_t, t, cond, frame_offset=cache.frames, **kwargs)
        finally:
            state.cache = state.rope = state.chunk_rope = None

    def _make_room(self, cache: KVCache) -> None:
        """Fit the next chunk into the window: restart it from the recorded inputs of its last frames (re-encoding,
        whose replayed writes are forwards of this model) or evict its oldest frames (rolling)."""
        if cache.must_restart:
            for written in cache.restart():
                self._write(*written, cache)
        else:
            cache.make_room()

    def write_cache(self, x0: Tensor, cond: Conditioning, cache: KVCache, noise_level: float = 0.0,
                    generator: torch.Generator | None = None) -> None:
        """Append a finished chunk's keys/values to ``cache``: ``x0`` at ``t = 0`` (or re-noised to ``noise_level``
        with noise from ``generator``, and run at that level)."""
        x, t = context_at(x0, noise_level, self.schedule, generator), x0.new_full((x0.shape[0],), noise_level)
        cache.record(x, t, cond)
        self._write(x, t, cond, cache)

    @torch.no_grad()
    def _write(self, x: Tensor, t: Tensor, cond: Conditioning, cache: KVCache) -> None:
        """One forward of ``x`` at ``t`` against ``cache``, only until the last layer has written its keys/values
        (that layer's attention and the prediction are never read)."""
        self._state.write_only = True
        try:
            self(x, t, cond, cache=cache)
        except _CacheWritten:
            pass
        finally:
            self._state.write_only = False
        cache.commit(x.shape[2])

    def _window_rope(self, cache: KVCache, x: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE tables for window positions ``0 .. capacity + chunk - 1`` at this frame size (built once per cache)."""
        key = (x.shape[3], x.shape[4])
        if cache.rope is None or cache.rope[0] != key:
            frames = cache.capacity + self.chunk_frames
            probe = x.new_empty((1, 0, frames, x.shape[3], x.shape[4]))  # the RoPE module reads only the shape
            cache.rope = (key, tuple(t.to(x.device) for t in self.transformer.rope(probe)))
        return cache.rope[1]

    def new_cache(self, batch: int, height: int, width: int, capacity: int, sinks: int = 0, reencode: int = 0,
                  device=None, dtype: torch.dtype | None = None) -> KVCache:
        """Preallocated buffers for latents of ``height x width`` and a window of ``capacity`` frames."""
        _, p_h, p_w = self.config.patch_size
        heads, head_dim = self.config.num_attention_heads, self.config.attention_head_dim
        param = self.transformer.blocks[0].attn1.to_k.weight  # keys/values come out in its dtype
        return KVCache(len(self.transformer.blocks), batch, (height // p_h) * (width // p_w), capacity,
                       self.chunk_frames, heads, head_dim, sinks, reencode, device or param.device,
                       dtype or param.dtype)


def context_at(x0: Tensor, noise_level: float, schedule: Schedule, generator: torch.Generator | None) -> Tensor:
    """A finished chunk as later chunks see it: ``x0`` itself, or re-noised to ``noise_level`` (``context_noise``)."""
    return schedule.add_noise(x0, noise_like(x0, generator), noise_level) if noise_level else x0


def denoise_chunk(step: Callable[[Tensor, TimeLike], Tensor], noise: Tensor, times: Sequence[TimeLike],
                  schedule: Schedule, generator: torch.Generator | None = None, grad_step: int | None = None) -> Tensor:
    """A few-step student's sampler on one chunk: ``step(x, t) -> x0`` at each time (floats, or 0-d tensors from
    :func:`device_times`), re-noised with fresh noise to the next. With ``grad_step = k`` the chain stops at step
    ``k`` and only that call records gradients (Self-Forcing's gradient through one randomly chosen step); otherwise
    nothing does."""
    x, last = noise, len(times) - 1 if grad_step is None else grad_step
    for k in range(last + 1):
        with torch.set_grad_enabled(grad_step == k and torch.is_grad_enabled()):
            x0 = step(x, times[k])
        if k < last:
            x = schedule.add_noise(x0.detach(), noise_like(x0, generator), times[k + 1])
    return x0


def _chunks(frames: int, chunk_frames: int) -> list[slice]:
    return [slice(s, min(s + chunk_frames, frames)) for s in range(0, frames, chunk_frames)]


def stream_sample(model: CausalWanDenoiser, noise: Tensor, cond: Conditioning, times: list[float],
                  cache: KVCache | None = None, generator: torch.Generator | None = None,
                  grad_steps: list[int] | None = None, cache_frames: int = 0, sink_frames: int = 0,
                  context_noise: float = 0.0, reencode_frames: int = 0) -> Tensor:
    """Generate ``noise.shape[2]`` frames chunk by chunk with the KV cache; after each chunk its ``x0`` is re-run at
    ``t = 0`` (or re-noised to ``context_noise``) to write the cache. Without ``cache``, a fresh one with a window
    of ``cache_frames`` (0: the whole clip), ``sink_frames`` and ``reencode_frames`` (:class:`KVCache`); it dies
    with the call, so the last chunk is not written to it (a forward nobody reads: Self-Forcing training's
    rollouts).

    ``grad_steps[c]`` makes chunk ``c`` stop at that step with gradient (Self-Forcing training); the cache is
    written without gradient from the detached ``x0``.
    """
    B, _, T, H, W = noise.shape
    fresh = cache is None
    if fresh:
        cache = model.new_cache(B, H, W, capacity=cache_frames or T, sinks=sink_frames, reencode=reencode_frames,
                                device=noise.device)
    out, times, chunks = [], device_times(times, noise.device), _chunks(T, model.chunk_frames)
    step = lambda x, t: model.denoise(x, t.expand(B), cond, cache=cache)  # noqa: E731
    for c, frames in enumerate(chunks):
        x0 = denoise_chunk(step, noise[:, :, frames], times, model.schedule, generator,
                           None if grad_steps is None else grad_steps[c])
        if not fresh or c < len(chunks) - 1:
            model.write_cache(x0.detach(), cond, cache, context_noise, generator)
        out.append(x0)
    return torch.cat(out, dim=2)


def masked_sample(model: CausalWanDenoiser, noise: Tensor, cond: Conditioning, times: list[float],
                  generator: torch.Generator | None = None, context_noise: float = 0.0) -> Tensor:
    """The same generation as :func:`stream_sample` without a cache: every step runs the whole prefix (earlier
    chunks as the cache holds them, at ``t = context_noise``; the current chunk at its time) through the
    block-masked forward. The reference that streaming must equal; quadratic in the number of chunks."""
    B, _, T = noise.shape[:3]
    done: list[Tensor] = []
    context: list[Tensor] = []
    for frames in _chunks(T, model.chunk_frames):
        prefix = sum(x.shape[2] for x in done)

        def step(x: Tensor, t: float) -> Tensor:
            clip = torch.cat([*context, x], dim=2)
            per_frame = torch.full((B, clip.shape[2]), context_noise, device=x.device)
            per_frame[:, prefix:] = t
            return model.denoise(clip, per_frame, cond)[:, :, prefix:]

        done.append(denoise_chunk(step, noise[:, :, frames], times, model.schedule, generator))
        context.append(context_at(done[-1], context_noise, model.schedule, generator))
    return torch.cat(done, dim=2)


def forcing_rollout(model: CausalWanDenoiser, noise: Tensor, cond: Conditioning, times: list[float],
                    frame_steps: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Diffusion forcing (Chen et al. 2024) over the student's steps: every frame (in practice every chunk) runs
    the student's own sampler up to its step ``frame_steps[b, f]``, all chunks advancing together through the
    block-masked model (so a chunk sees earlier chunks at their current noise levels). Returns the states and
    their per-frame times ``[B, T]``; no gradient."""
    table = torch.tensor(times, device=noise.device)
    frame_steps = frame_steps.to(noise.device)
    x = noise
    with torch.no_grad():
        for k in range(int(frame_steps.max())):
            t = table[frame_steps.clamp(max=k)]
            x0 = model.denoise(x, t, cond)
            advance = (frame_steps > k)[:, None, :, None, None]
            x = torch.where(advance, model.schedule.add_noise(x0, noise_like(x0, generator),
                                                              table[k + 1]), x)
    return x, table[frame_steps]


def chunk_steps(batch: int, frames: int, chunk_frames: int, steps: int, generator: torch.Generator) -> Tensor:
    """An independent random step index per sample and chunk, repeated over the chunk's frames: ``[B, T]``."""
    chunks = -(-frames // chunk_frames)
    drawn = torch.randint(steps, (batch, chunks), generator=generator, device=generator.device)
    return drawn.repeat_interleave(chunk_frames, dim=1)[:, :frames]


def make_causal_student(model: WanDenoiser, chunk_frames: int, init: str = "") -> CausalWanDenoiser:
    """A trainable causal copy of a (bidirectional) Wan teacher, or the trained model directory ``init`` when given
    (CausVid starts causal DMD from the ODE-regression student). The student takes ``init``'s inputs: a teacher of
    long-video windows (an offset channel) distils a student that, like every streaming student, has none."""
    if not isinstance(model, WanDenoiser):
        raise ValueError(f"causal students need a Wan teacher (diffusers WanTransformer3DModel), got "
                         f"{type(model).__name__}")
    if not init:
        return CausalWanDenoiser.from_bidirectional(make_student(model), chunk_frames)
    trained = WanDenoiser.from_pretrained(init, schedule=model.schedule)
    if trained.coordinate_frames != model.coordinate_frames:
        raise ValueError(f"student.init {init} has coordinate_frames = {trained.coordinate_frames}, the teacher "
                         f"{model.coordinate_frames}: initialise from a model trained from this teacher")
    return CausalWanDenoiser.from_bidirectional(trained.requires_grad_(True).train(), chunk_frames)


def causal_description(student, data) -> dict:
    """What ``method.json`` records of a causal student (``[student]`` and ``[data]`` of its job), for export."""
    return {"chunk_frames": student.chunk_frames, "train_frames": data.frames, "mode": student.mode,
            "cache_frames": cache_window(student.cache_frames, data.frames, student.chunk_frames, student.sink_frames),
            "sink_frames": student.sink_frames,
            "rollout_frames": student.rollout_frames or data.frames, "context_noise": student.context_noise,
            "reencode_frames": student.reencode_frames,
            "latent_size": [data.channels, data.height, data.width]}
