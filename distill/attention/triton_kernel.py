"""Block-sparse attention in Triton, forward and backward, in the manner of FlashAttention-2 (Dao 2023):
each program walks only the kept blocks of its row (forward, dq) or column (dk, dv) of the block mask,
keeping the softmax online in fp32 with exp2 and the log2(e)-folded scale.

Layout: q, k, v ``[B, H, N, D]`` (tile-major, N a multiple of the block), the kept key blocks per query block
as a padded index ``[H or 1, Q, max_kept]`` plus counts ``[H or 1, Q]``, and the transpose of that index for
the dk/dv kernel. Padded keys (tile-major padding) are masked inside the blocks that hold them.

Launch shapes are explicit (:class:`KernelConfig`), not autotuned: autotuning re-benchmarks every config at each
new shape inside a training or sampling run, and hides which config a measurement used. ``FWD_CANDIDATES`` and
``BWD_CANDIDATES`` are the space that ``eval/bench_attention.py --sweep`` times on a GPU; ``DEFAULT`` is what the
product runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from distill.attention.sparse import BlockSparse

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KiB)


def runs_on(x: Tensor) -> bool:
    """Whether the kernel runs for this tensor: CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests)."""
    return x.is_cuda or (_INTERPRET and x.device.type == "cpu")


@dataclass(frozen=True)
class Launch:
    """One kernel's launch shape: BLOCK_M queries x BLOCK_N keys per step (sub-blocks of the pattern's block),
    warps, and software-pipeline stages of the tile loads (shared memory grows with stages). ``tma``: the tiles
    that a program streams over its kept blocks come by Hopper's bulk tensor copies (TMA) straight into shared
    memory, where the tensor cores read them, instead of by per-thread loads that need address registers."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    tma: bool = False

    def fit(self, block: int) -> Launch:
        """The launch for blocks of ``block`` tokens: sub-blocks no larger than a block (powers of two, so they
        tile it). The interpreter always runs 16 x 16 sub-blocks: fast, and tests walk several per block."""
        if _INTERPRET:
            return Launch(16, 16, 4, 1, self.tma)
        return replace(self, block_m=min(self.block_m, block), block_n=min(self.block_n, block))

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}w{self.warps}s{self.stages}{'tma' if self.tma else ''}"


@dataclass(frozen=True)
class KernelConfig:
    """Launch shapes of the forward, dk/dv and dq kernels."""

    fwd: Launch
    dkdv: Launch
    dq: Launch

    def __str__(self) -> str:
        return f"fwd {self.fwd} dkdv {self.dkdv} dq {self.dq}"


# The sweep's space at Wan's shapes (D = 128, tiles of 128 tokens); each compiles for sm_90 within shared memory
# and without register spills (tests/test_attention_kernel.py). Forward: 128 queries (the whole tile, so a key
# tile is read once per query tile) by 64 or 128 keys; the 4-warp 64 x 64 shapes fit two programs per SM, whose
# softmax and matmuls then overlap, for twice the key/value traffic. Backward: (dkdv, dq) pairs.
# The TMA variants of the best shapes (Hopper bulk tensor copies of the streamed tiles) won the second H200 sweep;
# the five pairs after them (deeper pipelines, wider dq tiles around that winner) did not beat it in the third. The
# last twelve use one-warpgroup launches small enough (registers, shared memory) for two programs per SM, whose
# softmax and matmuls then overlap (within one program Triton waits for each score matmul before its softmax):
# dk/dv over 64 keys won the fourth, fifth and sixth sweeps.
FWD_CANDIDATES = (Launch(128, 128, 8, 2), Launch(128, 128, 8, 3), Launch(128, 64, 8, 2), Launch(128, 64, 8, 3),
                  Launch(128, 64, 8, 4), Launch(64, 64, 4, 2), Launch(64, 64, 4, 3),
                  Launch(128, 128, 8, 2, True), Launch(128, 128, 8, 3, True), Launch(128, 64, 8, 3, True),
                  Launch(64, 64, 4, 2, True), Launch(64, 32, 4, 4, True))  # two per SM (82 KB, <= 134 regs): lost
BWD_CANDIDATES = ((Launch(64, 64, 8, 3), Launch(128, 64, 8, 2)), (Launch(64, 64, 8, 2), Launch(128, 64, 8, 3)),
                  (Launch(32, 128, 8, 2), Launch(128, 64, 8, 2)), (Launch(64, 64, 8, 4), Launch(128, 128, 8, 2)),
                  (Launch(32, 128, 8, 2, True), Launch(128, 64, 8, 2, True)),
                  (Launch(32, 128, 8, 3, True), Launch(128, 64, 8, 3, True)),
                  (Launch(64, 64, 8, 3, True), Launch(128, 64, 8, 3, True)),
                  (Launch(32, 128, 8, 4, True), Launch(128, 64, 8, 4, True)),
                  (Launch(32, 128, 8, 3, True), Launch(128, 128, 8, 2, True)),
                  (Launch(32, 128, 8, 2, True), Launch(128, 64, 8, 3, True)),
                  (Launch(32, 128, 8, 3, True), Launch(128, 64, 8, 2, True)),
                  (Launch(32, 128, 8, 3, True), Launch(64, 128, 8, 3, True)),
                  (Launch(32, 64, 4, 2, True), Launch(128, 64, 8, 3, True)),
                  (Launch(32, 64, 4, 3, True), Launch(128, 64, 8, 3, True)),
                  (Launch(32, 64, 4, 3, True), Launch(64, 64, 4, 2, True)),
                  (Launch(32, 64, 4, 2, True), Launch(64, 32, 4, 3, True)),
                  (Launch(32, 128, 8, 3, True), Launch(64, 64, 4, 2, True)),
                  (Launch(32, 128, 8, 3, True), Launch(64, 32, 4, 3, True)),
                  (Launch(32, 64, 4, 4, True), Launch(128, 64, 8, 3, True)),
                  (Launch(32, 64, 4, 5, True), Launch(128, 64, 8, 3, True)),
                  (Launch(16, 64, 4, 4, True), Launch(128, 64, 8, 3, True)),
                  (Launch(16, 64, 4, 6, True), Launch(128, 64, 8, 3, True)),
                  (Launch(32, 64, 4, 4, True), Launch(128, 64, 8, 4, True)),
                  (Launch(32, 64, 4, 3, True), Launch(128, 128, 8, 2, True)))
# DEFAULT is the sweep's choice on an H200 (eval/results/attention_sweep_h200.json, 480p, 20% density): every
# kernel streams its tiles by TMA. Forward 128 x 128, 3 stages: 0.87-0.92 of dense SDPA's rate (0.82 without
# TMA). Backward: dk/dv by one-warpgroup programs of 64 keys, two per SM, and the 8-warp dq kernel: 0.83-0.84
# forward+backward (0.79-0.81 with one 8-warp dk/dv program of 128 keys per SM; 0.66 without TMA). Capping 8-warp
# launches at 128 registers to fit two per SM lost (0.49-0.81, the sixth sweep). A backward adding dq into an fp32
# buffer with atomics from the dk/dv kernel (5 matmuls per kept pair instead of 7) ran at most 0.58 (0.55 by bulk
# TMA reductions) in the first six sweeps: the adds cost more than the recomputation, so it was removed. The
# seventh sweep (attention_sweep_h200_seventh.json): the two-per-SM forward launches lost (0.74 and 0.66 against
# 0.93), and its backward pick, dk/dv with 5 stages, timed 0.845 forward+backward in the benchmark after it
# (attention_h200_seventh.json), within run-to-run spread (+-1.5%) of the 3-stage launch that won three sweeps
# before, so DEFAULT keeps that. The H100 sweep (attention_sweep_h100.json) agrees: forward 0.95; forward+backward
# 0.813 for DEFAULT's pair, 0.814 with 4 stages, every other pair 0.806 or less.
DEFAULT = KernelConfig(fwd=Launch(128, 128, 8, 3, True), dkdv=Launch(32, 64, 4, 3, True),
                       dq=Launch(128, 64, 8, 3, True))
# float32 inputs are the exact reference path (tests), not a speed path: one small launch whose tiles fit shared
# memory at any head dim, for every kernel (with or without TMA, as the launch it stands in for)
IEEE_LAUNCH = Launch(32, 32, 4, 2)


@triton.jit
def _start(idx_row, it, total, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """First token of the ``it``-th (kept block, sub-block) step of one index row (0 past the end). Loops load
    the next step's start at the end of a step, so the next tile loads depend only on a loop-carried scalar and
    Triton's pipeliner multi-buffers them (as in FlexAttention's kernels)."""
    subs = BLOCK // SUB
    block = tl.load(idx_row + it // subs, mask=it < total, other=0)
    return block * BLOCK + (it % subs) * SUB


@triton.jit
def _walk(IDX, CNT, h, s_ih, s_row, s_ch, row, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """For block ``row`` of the pattern: its index row, its number of (kept block, sub-block) steps and the
    first step's start token."""
    total = tl.load(CNT + h * s_ch + row) * (BLOCK // SUB)
    idx_row = IDX + h * s_ih + row * s_row
    return idx_row, total, _start(idx_row, 0, total, SUB, BLOCK)


@triton.jit
def _head(H, stride_b, stride_h):
    """This program's (batch * head) index, head, and int64 offset of its slice (int32 overflows on big batches)."""
    bh = tl.program_id(1)
    h = bh % H
    return bh, h, (bh // H).to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _ptrs(X, base, rows, stride_n, D: tl.constexpr):
    """Pointers to the ``[len(rows), D]`` block of rows ``rows`` of one (batch, head) slice."""
    return X + base + rows[:, None] * stride_n + tl.arange(0, D)[None, :]


@triton.jit
def _tma_coords(base, start, stride_n):
    """Where row ``start`` of the slice at element offset ``base`` lies in X's storage seen as rows of ``stride_n``
    elements (the descriptor of :func:`_streamed`): (row, column)."""
    return [(base // stride_n + start).to(tl.int32), (base % stride_n).to(tl.int32)]


@triton.jit
def _tile(X, X_TMA, base, start, tile_offsets, stride_n, TMA: tl.constexpr):
    """The kept sub-block of rows from ``start`` of one (batch, head) slice: one bulk tensor copy through the
    descriptor ``X_TMA``, or pointer loads."""
    if TMA:
        return X_TMA.load(_tma_coords(base, start, stride_n))
    return tl.load(X + base + start * stride_n + tile_offsets)


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b`` accumulated in place (wgmma on Hopper); exact fp32 for float32 inputs (the tests'
    reference precision), tensor-core precision otherwise."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _key_bias(BIAS, start, offs, HAS_PAD: tl.constexpr):
    """Added to the scores of the keys from ``start``: 0 at real keys, -inf at padding; zeros (no load) without
    padding. Kernels load it one step ahead so that its latency hides behind a step's matmuls."""
    if HAS_PAD:
        bias = tl.load(BIAS + start + offs)
    else:
        bias = tl.zeros_like(offs).to(tl.float32)
    return bias


@triton.jit
def _fwd(Q, K, V, K_TMA, V_TMA, O, LSE, IDX, CNT, BIAS, qk_scale,
         stride_b, stride_h, stride_n, s_ih, s_iq, s_ch,
         H, N,
         BLOCK: tl.constexpr, D: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M queries: online softmax over the kept key blocks of their tile."""
    pid_m = tl.program_id(0)
    bh, h, base = _head(H, stride_b, stride_h)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    tile_offsets = _ptrs(0, 0, offs, stride_n, D)  # a kept sub-block's offsets from its first token
    q = tl.load(_ptrs(Q, base, rows, stride_n, D))
    idx_row, total, start = _walk(IDX, CNT, h, s_ih, s_iq, s_ch, pid_m * BLOCK_M // BLOCK, BLOCK_N, BLOCK)
    bias = _key_bias(BIAS, start, offs, HAS_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for it in range(0, total):
        k = _tile(K, K_TMA, base, start, tile_offsets, stride_n, TMA)
        v = _tile(V, V_TMA, base, start, tile_offsets, stride_n, TMA)
        s = _mm(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + bias[None, :], IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one FMA per score
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
        start = _start(idx_row, it + 1, total, BLOCK_N, BLOCK)
        bias = _key_bias(BIAS, start, offs, HAS_PAD)
    acc = acc / l_i[:, None]
    tl.store(_ptrs(O, base, rows, stride_n, D), acc.to(O.dtype.element_ty))
    tl.store(LSE + bh * N + rows, m_i + tl.log2(l_i))


@triton.jit
def _bwd_dkdv(Q, K, V, DO, Q_TMA, DO_TMA, DK, DV, LSE, DELTA, IDX, CNT, BIAS, qk_scale, sm_scale,
              stride_b, stride_h, stride_n, s_ih, s_ik, s_ch,
              H, N,
              BLOCK: tl.constexpr, D: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_N keys: loops over the query blocks that keep their tile (transposed index)."""
    pid_n = tl.program_id(0)
    bh, h, base = _head(H, stride_b, stride_h)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_M)
    tile_offsets = _ptrs(0, 0, offs, stride_n, D)
    k = tl.load(_ptrs(K, base, cols, stride_n, D))
    v = tl.load(_ptrs(V, base, cols, stride_n, D))
    bias = _key_bias(BIAS, pid_n * BLOCK_N, tl.arange(0, BLOCK_N), HAS_PAD)
    idx_row, total, start = _walk(IDX, CNT, h, s_ih, s_ik, s_ch, pid_n * BLOCK_N // BLOCK, BLOCK_M, BLOCK)
    lse = tl.load(LSE + bh * N + start + offs)  # per-query terms, loaded one step ahead like the key bias
    delta = tl.load(DELTA + bh * N + start + offs)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for it in range(0, total):
        q = _tile(Q, Q_TMA, base, start, tile_offsets, stride_n, TMA)
        do = _tile(DO, DO_TMA, base, start, tile_offsets, stride_n, TMA)
        st = _mm(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32) + bias[:, None], IEEE)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        dv = _mm(pt.to(do.dtype), do, dv, IEEE)
        dpt = _mm(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)  # unscaled: dk takes the scale once, at the end
        dk = _mm(dst, q, dk, IEEE)
        start = _start(idx_row, it + 1, total, BLOCK_M, BLOCK)
        lse = tl.load(LSE + bh * N + start + offs)
        delta = tl.load(DELTA + bh * N + start + offs)
    tl.store(_ptrs(DK, base, cols, stride_n, D), (dk * sm_scale).to(DK.dtype.element_ty))
    tl.store(_ptrs(DV, base, cols, stride_n, D), dv.to(DV.dtype.element_ty))


@triton.jit
def _bwd_dq(Q, K, V, O, DO, K_TMA, V_TMA, DQ, LSE, DELTA, IDX, CNT, BIAS, qk_scale, sm_scale,
            stride_b, stride_h, stride_n, s_ih, s_iq, s_ch,
            H, N,
            BLOCK: tl.constexpr, D: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_M queries: loops over their kept key blocks. Runs first: it also computes and stores
    the softmax backward's per-row term rowsum(dO * O) that the dk/dv kernel reads (no separate pass over dO)."""
    pid_m = tl.program_id(0)
    bh, h, base = _head(H, stride_b, stride_h)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    tile_offsets = _ptrs(0, 0, offs, stride_n, D)  # a kept sub-block's offsets from its first token
    q = tl.load(_ptrs(Q, base, rows, stride_n, D))
    do = tl.load(_ptrs(DO, base, rows, stride_n, D))
    lse = tl.load(LSE + bh * N + rows)
    delta = tl.sum(tl.load(_ptrs(O, base, rows, stride_n, D)).to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * N + rows, delta)
    idx_row, total, start = _walk(IDX, CNT, h, s_ih, s_iq, s_ch, pid_m * BLOCK_M // BLOCK, BLOCK_N, BLOCK)
    bias = _key_bias(BIAS, start, offs, HAS_PAD)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for it in range(0, total):
        k = _tile(K, K_TMA, base, start, tile_offsets, stride_n, TMA)
        v = _tile(V, V_TMA, base, start, tile_offsets, stride_n, TMA)
        s = _mm(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32) + bias[None, :], IEEE)
        p = tl.exp2(s * qk_scale - lse[:, None])
        dp = _mm(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE)
        ds = p * (dp - delta[:, None])
        dq = _mm(ds.to(k.dtype), k, dq, IEEE)
        start = _start(idx_row, it + 1, total, BLOCK_N, BLOCK)
        bias = _key_bias(BIAS, start, offs, HAS_PAD)
    tl.store(_ptrs(DQ, base, rows, stride_n, D), (dq * sm_scale).to(DQ.dtype.element_ty))


def _check(q: Tensor, k: Tensor, v: Tensor, sparse: BlockSparse) -> None:
    b, h, n, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if d not in (16, 32, 64, 128) or sparse.block < 16 or sparse.block & (sparse.block - 1):
        raise ValueError(f"head dim {d} must be 16/32/64/128 and block {sparse.block} a power of two >= 16")
    if n != sparse.keep.shape[1] * sparse.block or sparse.keep.shape[1] != sparse.keep.shape[2]:
        raise ValueError(f"{n} tokens do not match the pattern: {tuple(sparse.keep.shape)} blocks of {sparse.block}")
    if sparse.heads not in (1, h):
        raise ValueError(f"pattern has {sparse.heads} heads, q has {h}")


def _index_args(index: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor, int, int, int]:
    """Index, counts and their strides (head stride 0 when one pattern serves all heads)."""
    idx, cnt = index[0].to(device), index[1].to(device)
    shared = idx.shape[0] == 1
    return idx, cnt, 0 if shared else idx.stride(0), idx.stride(1), 0 if shared else cnt.stride(0)


def _launch_args(launch: Launch, block: int, *streamed: Tensor) -> dict:
    """Keyword arguments that give a kernel ``launch``'s shape for blocks of ``block`` tokens of the ``streamed``
    tensors' dtype, and whether those come by TMA (only where every one's layout allows it, :func:`_tma_ready`)."""
    ieee = streamed[0].dtype == torch.float32
    fitted = (replace(IEEE_LAUNCH, tma=launch.tma) if ieee else launch).fit(block)
    return dict(BLOCK_M=fitted.block_m, BLOCK_N=fitted.block_n, num_warps=fitted.warps, num_stages=fitted.stages,
                TMA=fitted.tma and all(_tma_ready(x) for x in streamed))


def _tma_ready(x: Tensor) -> bool:
    """Whether bulk tensor copies can read ``x``: 16-byte aligned rows of ``stride_n`` elements that hold each
    (batch, head) slice as whole row segments. Contiguous ``[B, H, N, D]`` (a slice is N rows of D) and
    ``[B, N, H, D]`` memory (a head is D columns of each row) both do."""
    _, h, _, d = x.shape
    sb, sh, sn, sd = x.stride()
    aligned = x.data_ptr() % 16 == 0 and sn * x.element_size() % 16 == 0
    return aligned and sd == 1 and sb % sn == 0 and (sh % sn == 0 or (h - 1) * sh + d <= sn)


def _streamed(x: Tensor, rows: int, tma: bool) -> Tensor | TensorDescriptor:
    """What a kernel reads ``x``'s kept sub-blocks of ``rows`` tokens through: a TMA descriptor over its storage as
    rows of ``stride_n`` elements (:func:`_tma_coords` finds a slice's rows in it), or ``x`` for pointer loads."""
    if not tma:
        return x
    b, _, _, d = x.shape
    sb, sn = x.stride(0), x.stride(2)
    return TensorDescriptor(x, [b * sb // sn, sn], [sn, 1], [rows, d])


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sparse: BlockSparse, scale: float,
                config: KernelConfig) -> Tensor:
        if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):  # one stride set serves all
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, h, n, d = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
        idx, cnt, s_ih, s_iq, s_ch = _index_args(sparse.kv_index, q.device)
        bias = cnt if sparse.key_bias is None else sparse.key_bias.to(q.device)  # cnt: unused placeholder
        meta = dict(BLOCK=sparse.block, D=d, HAS_PAD=sparse.key_valid is not None, IEEE=q.dtype == torch.float32)
        launch = _launch_args(config.fwd, sparse.block, k, v)
        streamed = [_streamed(x, launch["BLOCK_N"], launch["TMA"]) for x in (k, v)]
        _fwd[(n // launch["BLOCK_M"], b * h)](q, k, v, *streamed, out, lse, idx, cnt, bias, scale * LOG2E,
                                               q.stride(0), q.stride(1), q.stride(2), s_ih, s_iq, s_ch, h, n, **meta,
                                               **launch)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sparse, ctx.scale, ctx.meta, ctx.bias, ctx.config = sparse, scale, meta, bias, config
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        sparse, scale, meta, config = ctx.sparse, ctx.scale, ctx.meta, ctx.config
        if grad_out.stride() != q.stride():
            grad_out = torch.empty_like(q).copy_(grad_out)
        b, h, n, d = q.shape
        strides = (q.stride(0), q.stride(1), q.stride(2))
        delta = torch.empty_like(lse)  # written by the dq kernel, read by the dk/dv kernel
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        idx, cnt, s_ih, s_iq, s_ch = _index_args(sparse.kv_index, q.device)
        launch = _launch_args(config.dq, sparse.block, k, v)
        streamed = [_streamed(x, launch["BLOCK_N"], launch["TMA"]) for x in (k, v)]
        _bwd_dq[(n // launch["BLOCK_M"], b * h)](
            q, k, v, out, grad_out, *streamed, dq, lse, delta, idx, cnt, ctx.bias, scale * LOG2E, scale, *strides,
            s_ih, s_iq, s_ch, h, n, **meta, **launch)
        idx, cnt, s_ih, s_iq, s_ch = _index_args(sparse.q_index, q.device)
        launch = _launch_args(config.dkdv, sparse.block, q, grad_out)
        streamed = [_streamed(x, launch["BLOCK_M"], launch["TMA"]) for x in (q, grad_out)]
        _bwd_dkdv[(n // launch["BLOCK_N"], b * h)](
            q, k, v, grad_out, *streamed, dk, dv, lse, delta, idx, cnt, ctx.bias, scale * LOG2E, scale, *strides,
            s_ih, s_iq, s_ch, h, n, **meta, **launch)
        return dq, dk, dv, None, None, None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, sparse: BlockSparse, scale: float | None = None,
                           config: KernelConfig = DEFAULT) -> Tensor:
    """Softmax attention of ``q, k, v`` ``[B, H, N, D]`` over the kept blocks of ``sparse`` (differentiable).
    Strided views such as ``[B, N, H, D].transpose(1, 2)`` (the processor's layout) are read without a copy."""
    _check(q, k, v, sparse)
    return _BlockSparseAttention.apply(q, k, v, sparse, q.shape[-1] ** -0.5 if scale is None else scale, config)
