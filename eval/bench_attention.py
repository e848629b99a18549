"""Attention backends on a GPU: dense SDPA, FlexAttention and the project's Triton block-sparse kernel under
sliding tile windows at several densities, forward and forward+backward, at Wan's 480p and 720p token counts;
then the Wan 1.3B-size transformer (random weights) end to end with each backend at each shape. ``--sweep``
instead times every candidate launch config of the Triton kernel (``FWD_CANDIDATES``, ``BWD_CANDIDATES``) at
480p and about 20% density, each checked against a float32 reference, and writes attention_sweep_<gpu>.json.

Rates are effective TFLOP/s on kept blocks: 4*D FLOPs per kept (query, key) pair per head for the forward,
2.5 times that for the backward (FlashAttention's convention), divided by the measured time. Dense SDPA's
rate counts all N^2 pairs of the real (unpadded) tokens. ``--quick`` runs tiny sizes (on CPU, where the
sparse backends fall back to the SDPA reference) so that the script is known to run.

    python eval/bench_attention.py                 # GPU: writes eval/results/attention_<gpu>.json
    python eval/bench_attention.py --shapes 720p --append
    python eval/bench_attention.py --sweep         # GPU, ~2 minutes: eval/results/attention_sweep_<gpu>.json
    python eval/bench_attention.py --quick --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from torch import Tensor
from triton.errors import TritonError

from distill.attention import AttentionSpec, BlockSparse, TileLayout, install, patterns, uninstall
from distill.attention import triton_kernel as tk
from distill.attention.backends import get_backend
from eval.results import device_name, gpu_slug, sync, write_results

BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (5 matmuls against 2)


@dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int, int]  # latent-patch tokens (frames, rows, columns)
    heads: int
    head_dim: int
    preset: str  # the Wan transformer of the model rows, its latents [C, T, H, W] and text length
    latents: tuple[int, int, int, int]
    text_len: int


FULL_SHAPES = [Shape("480p", (21, 30, 52), 12, 128, "wan2.1-t2v-1.3b", (16, 21, 60, 104), 512),
               Shape("720p", (21, 45, 80), 12, 128, "wan2.1-t2v-1.3b", (16, 21, 90, 160), 512)]
QUICK_SHAPES = [Shape("quick", (4, 8, 10), 2, 16, "tiny-random", (3, 2, 16, 16), 8)]  # columns padded 10 -> 12


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Mean milliseconds per call (CUDA events on a GPU, wall clock on CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        sync(device)
        return start.elapsed_time(end) / iters
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - began) * 1000 / iters


def window_for_density(tiles: tuple[int, int, int], target: float) -> tuple[tuple[int, int, int], float]:
    """The sliding tile window (tiles per axis) whose density is within a percent of the closest to ``target``
    and, among those, covers the most even fraction of each axis (a local window in space and time).
    Returns (window, actual density)."""
    options = []
    for window in itertools.product(*(range(1, n + 1) for n in tiles)):
        covered = [patterns.window_keep(n, w).float().mean().item() for n, w in zip(tiles, window)]
        options.append((abs(math.prod(covered) - target), max(covered) - min(covered), window, math.prod(covered)))
    closest = min(o[0] for o in options)
    _, _, window, density = min((o for o in options if o[0] <= closest + 0.01), key=lambda o: o[1])
    return window, density


def attention_call(fn: Callable, q, k, v, sparse: BlockSparse | None, passes: str) -> Callable[[], object]:
    """One timed call of backend ``fn``: forward only, or forward and backward (gradients of q, k, v)."""
    scale = q.shape[-1] ** -0.5
    if passes == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, sparse, scale)
    else:
        grad = torch.randn_like(q)

        def run():
            out = fn(q, k, v, sparse, scale)
            return torch.autograd.grad(out, (q, k, v), grad)
    return run


SDPA_KERNELS = ("flash", "cudnn", "efficient")  # dense SDPA's kernels, each timed beside the default choice
PASSES = ("fwd", "fwdbwd")


@contextlib.contextmanager
def sdpa_kernel(name: str):
    """Pin SDPA to one kernel ("default" leaves PyTorch's choice)."""
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel as pin

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    with pin([backend]):
        yield


def what_ran(backend: str, device: torch.device, passes: str, sparse: bool) -> str:
    """The implementation that actually computed a row (CPU fallbacks are the SDPA reference)."""
    if backend == "triton" and (not sparse or not tk.runs_on(torch.empty(0, device=device))):
        return "sdpa-reference"
    if backend == "flex" and device.type == "cpu" and passes == "fwdbwd":
        return "sdpa-reference"
    return backend


def flops(pairs: int, head_dim: int, heads: int, passes: str) -> int:
    """4*D FLOPs per (query, key) pair per head forward, BWD_FACTOR times that more for the backward."""
    return 4 * pairs * head_dim * heads * (1 + (BWD_FACTOR if passes == "fwdbwd" else 0))


def tiled_inputs(layout: TileLayout, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """Random q, k, v ``[1, H, tokens, D]`` in model order (dense SDPA's input), and the same tokens tile-major in
    ``[B, N, H, D]`` memory seen as ``[B, H, N, D]``: what the Wan processor passes (and FlexAttention, compiled
    for these strides here, is reused by the model rows)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dense = [torch.randn(1, heads, layout.tokens, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
             for _ in range(3)]
    tiled = [layout.to_tiles(x.detach().transpose(1, 2)).transpose(1, 2).requires_grad_() for x in dense]
    return dense, tiled


def tile_pattern(layout: TileLayout, target: float, device: torch.device) -> tuple[list[int], float, BlockSparse]:
    """The sliding tile window closest to density ``target``: (window, density, pattern)."""
    window, density = window_for_density(layout.tiles, target)
    keep = patterns.sliding_tile(layout.tiles, window, device)
    return list(window), density, BlockSparse(keep, layout.block, layout.key_valid(device))


def kept_pairs(sparse: BlockSparse) -> int:
    return int(sparse.keep.sum().item()) * sparse.block ** 2


def shape_fields(layout: TileLayout, shape: Shape, dtype: torch.dtype) -> dict:
    return dict(tokens=layout.tokens, padded_tokens=layout.padded_tokens, heads=shape.heads, head_dim=shape.head_dim,
                grid=list(shape.grid), tile=list(layout.tile), dtype=str(dtype).replace("torch.", ""))


def sdpa_rows(layout: TileLayout, shape: Shape, dense: list[Tensor], kernels: list[str], device: torch.device,
              dtype: torch.dtype, warmup: int, iters: int) -> tuple[list[dict], dict[str, tuple[float, float]]]:
    """Dense SDPA with each of ``kernels`` ("default" first), both passes; and the default's (TFLOP/s, ms) per
    pass, which every other row is compared with."""
    rows, baseline = [], {}
    for kernel in kernels:
        for passes in PASSES:
            try:
                with sdpa_kernel(kernel):
                    ms = time_ms(attention_call(get_backend("sdpa"), *dense, None, passes), device, warmup, iters)
            except RuntimeError as err:  # this build or GPU lacks that SDPA kernel
                print(f"sdpa {kernel}: skipped ({str(err).splitlines()[0][:80]})")
                continue
            rate = flops(layout.tokens ** 2, shape.head_dim, shape.heads, passes) / ms / 1e9
            baseline.setdefault(passes, (rate, ms))
            rows.append(dict(shape_fields(layout, shape, dtype), backend="sdpa", kernel=f"sdpa-{kernel}", density=1.0,
                             window=None, **measured(passes, ms, rate, baseline)))
    return rows, baseline


def measured(passes: str, ms: float, rate: float, baseline: dict[str, tuple[float, float]]) -> dict:
    """A row's timing fields, against dense SDPA's ``baseline``."""
    return {"pass": passes, "ms": round(ms, 3), "tflops_kept": round(rate, 1),
            "ratio_to_sdpa": round(rate / baseline[passes][0], 3), "speedup": round(baseline[passes][1] / ms, 2)}


def launch_config(backend: str) -> dict:
    """The Triton kernel's launch config, recorded with its rows (what the product ran: the default)."""
    return {"config": str(tk.DEFAULT)} if backend == "triton" else {}


def kernel_rows(shape: Shape, densities: list[float], tile: tuple[int, int, int], device: torch.device,
                dtype: torch.dtype, warmup: int, iters: int) -> list[dict]:
    """Dense SDPA, then flex and triton at each density, forward and forward+backward."""
    layout = TileLayout(shape.grid, tile)
    dense, tiled = tiled_inputs(layout, shape.heads, shape.head_dim, device, dtype, seed=0)
    kernels = ["default"] + (list(SDPA_KERNELS) if device.type == "cuda" else [])
    rows, baseline = sdpa_rows(layout, shape, dense, kernels, device, dtype, warmup, iters)
    for target in densities:
        window, density, sparse = tile_pattern(layout, target, device)
        with torch.no_grad():  # the two sparse backends must agree before their times mean anything
            outs = [get_backend(b)(*[x.detach() for x in tiled], sparse, shape.head_dim ** -0.5)
                    for b in ("flex", "triton")]
            max_diff = (outs[0].float() - outs[1].float()).abs().max().item()
        for backend in ("flex", "triton"):
            for passes in PASSES:
                ms = time_ms(attention_call(get_backend(backend), *tiled, sparse, passes), device, warmup, iters)
                rate = flops(kept_pairs(sparse), shape.head_dim, shape.heads, passes) / ms / 1e9
                rows.append(dict(shape_fields(layout, shape, dtype), backend=backend,
                                 kernel=what_ran(backend, device, passes, True), target_density=target,
                                 density=round(density, 4), window=window, **measured(passes, ms, rate, baseline),
                                 max_diff_flex_vs_triton=round(max_diff, 5), **launch_config(backend)))
    return rows


def reference(q: Tensor, k: Tensor, v: Tensor, sparse: BlockSparse, scale: float, grad: Tensor,
              chunk: int = 16) -> list[Tensor]:
    """Float32 (out, dq, dk, dv) of block-sparse attention, computed ``chunk`` query blocks at a time from their
    gathered kept key blocks: memory grows with one chunk's kept pairs, not N^2, so it runs at full size (dense
    masked SDPA would need N^2 per head) and shares no code with the kernels it checks."""
    q, grad = q.detach().float(), grad.float()
    k, v = (x.detach().float().requires_grad_() for x in (k, v))
    b, h, n, d = q.shape
    block, blocks = sparse.block, n // sparse.block
    idx, cnt = (x.to(q.device) for x in sparse.kv_index)
    bias = (sparse.key_bias.to(q.device) if sparse.key_bias is not None
            else torch.zeros(n, device=q.device)).view(blocks, block)
    heads = torch.arange(h, device=q.device).view(h, 1, 1)
    kb, vb = k.view(b, h, blocks, block, d), v.view(b, h, blocks, block, d)
    out, dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.zeros_like(q), torch.zeros_like(q)
    for first in range(0, blocks, chunk):
        ids = idx[:, first:first + chunk].long()  # [H or 1, c, kept]
        rows = slice(first * block, (first + ids.shape[1]) * block)
        kept = torch.arange(ids.shape[-1], device=q.device) < cnt[:, first:first + chunk, None]
        mask = bias[ids] + torch.where(kept, 0.0, float("-inf"))[..., None]  # [H or 1, c, kept, block]
        qc = q[:, :, rows].reshape(b, h, -1, block, d).requires_grad_()
        scores = torch.einsum("bhcqd,bhcwkd->bhcqwk", qc, kb[:, heads, ids]) * scale + mask[None, :, :, None]
        probs = scores.flatten(-2).softmax(-1).view_as(scores)
        oc = torch.einsum("bhcqwk,bhcwkd->bhcqd", probs, vb[:, heads, ids])
        dqc, dkc, dvc = torch.autograd.grad(oc, (qc, k, v), grad[:, :, rows].reshape_as(oc))
        out[:, :, rows], dq[:, :, rows] = oc.detach().flatten(2, 3), dqc.flatten(2, 3)
        dk += dkc
        dv += dvc
    return [out, dq, dk, dv]


def check_errors(fn: Callable, inputs: list[Tensor], sparse: BlockSparse, grad: Tensor,
                 expected: list[Tensor]) -> tuple[float, float]:
    """(max abs difference, the same relative to the reference's largest magnitude) over out, dq, dk, dv."""
    q, k, v = (x.detach().requires_grad_() for x in inputs)
    out = fn(q, k, v, sparse, q.shape[-1] ** -0.5)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    diffs = [(a.float() - e).abs().max().item() for a, e in zip(got, expected)]
    relative = [diff / e.abs().max().item() for diff, e in zip(diffs, expected)]
    return max(diffs), max(relative)


def sweep_rows(shape: Shape, density: float, tile: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
               warmup: int, iters: int, tolerance: float = 2e-2) -> list[dict]:
    """Dense SDPA, then every forward candidate (forward pass; the default backward) and every backward candidate
    (forward+backward; the default forward), then the best of each together (``chosen``). Each config is first
    checked on fresh inputs of two heads against :func:`reference`; one above ``tolerance`` is never chosen."""
    layout = TileLayout(shape.grid, tile)
    dense, tiled = tiled_inputs(layout, shape.heads, shape.head_dim, device, dtype, seed=0)
    rows, baseline = sdpa_rows(layout, shape, dense, ["default"], device, dtype, warmup, iters)
    window, actual, sparse = tile_pattern(layout, density, device)
    _, fresh = tiled_inputs(layout, min(2, shape.heads), shape.head_dim, device, dtype, seed=1)
    grad = torch.randn_like(fresh[0])
    expected = reference(*fresh, sparse, shape.head_dim ** -0.5, grad)
    ran = what_ran("triton", device, "fwd", True)
    fields = dict(shape_fields(layout, shape, dtype), backend="triton", kernel=ran, target_density=density,
                  density=round(actual, 4), window=window)

    def measure(config: tk.KernelConfig, passes: str, role: str) -> dict:
        fn = partial(tk.block_sparse_attention, config=config) if ran == "triton" else get_backend("triton")
        row = dict(fields, config=str(config), role=role, **{"pass": passes})
        try:
            max_abs, relative = check_errors(fn, fresh, sparse, grad, expected)
            ms = time_ms(attention_call(fn, *tiled, sparse, passes), device, warmup, iters)
        except (TritonError, RuntimeError) as err:  # a launch that this GPU cannot run: recorded, never chosen
            return dict(row, error=str(err).splitlines()[0][:200], ok=False)
        rate = flops(kept_pairs(sparse), shape.head_dim, shape.heads, passes) / ms / 1e9
        return dict(row, **measured(passes, ms, rate, baseline), max_abs_diff=round(max_abs, 5),
                    max_rel_diff=round(relative, 5), ok=relative < tolerance)

    def best(candidates: list[dict]) -> int:
        """Index of the fastest correct candidate (the first when none is)."""
        ok = [i for i, r in enumerate(candidates) if r["ok"]]
        return min(ok, key=lambda i: candidates[i]["ms"], default=0)

    fwd = [measure(replace(tk.DEFAULT, fwd=f), "fwd", "fwd candidate") for f in tk.FWD_CANDIDATES]
    bwd = [measure(replace(tk.DEFAULT, dkdv=dkdv, dq=dq), "fwdbwd", "bwd candidate")
           for dkdv, dq in tk.BWD_CANDIDATES]
    chosen = tk.KernelConfig(tk.FWD_CANDIDATES[best(fwd)], *tk.BWD_CANDIDATES[best(bwd)])
    return rows + fwd + bwd + [measure(chosen, passes, "chosen") for passes in PASSES]


def model_rows(shape: Shape, density: float, tile: tuple[int, int, int], device: torch.device, dtype: torch.dtype,
               warmup: int, iters: int) -> list[dict]:
    """The Wan transformer of ``shape`` (random weights) forward and forward+backward (gradient checkpointing
    on) with dense SDPA and with a sliding tile window of about ``density`` through flex and triton."""
    import teachers
    from distill.conditioning import Conditioning

    model = teachers.load("wan", shape.preset, dtype=dtype).to(device)
    cfg = model.config
    grid = tuple(n // p for n, p in zip(shape.latents[1:], cfg.patch_size))
    layout = TileLayout(grid, tile)
    window, actual = window_for_density(layout.tiles, density)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, *shape.latents, device=device, generator=g)
    cond = Conditioning(torch.randn(1, shape.text_len, cfg.text_dim, device=device, generator=g))
    t = torch.tensor([0.7], device=device)
    runs = [("sdpa", "dense", None, 1.0)] + [(b, "tile", list(window), actual) for b in ("flex", "triton")]
    rows, dense_ms = [], {}
    for backend, pattern, win, dens in runs:
        if win is None:
            uninstall(model)  # diffusers' own processor: the dense baseline
        else:
            install(model, AttentionSpec(backend=backend, pattern=pattern, tile=list(tile), window=win))
        for passes in PASSES:
            if passes == "fwd":
                def run():
                    with torch.no_grad():
                        return model(x, t, cond)
            else:
                model.enable_gradient_checkpointing()

                def run():
                    model(x, t, cond).float().square().mean().backward()
            ms = time_ms(run, device, warmup, iters)
            dense_ms.setdefault(passes, ms)
            rows.append(dict(backend=backend, kernel=what_ran(backend, device, passes, win is not None),
                             model_size=shape.preset, latents=list(shape.latents), tokens=layout.tokens,
                             density=round(dens, 4), window=win, tile=list(tile), **{"pass": passes}, ms=round(ms, 1),
                             speedup=round(dense_ms[passes] / ms, 2), gradient_checkpointing=passes == "fwdbwd",
                             **launch_config(backend)))
        model.transformer.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
    return rows


NOTES = ("batch 1, {dtype}; sliding tile windows (tile {tile} tokens) chosen to hit the target densities, 'density' = "
         "kept tile pairs / all tile pairs of the padded grid; tflops_kept counts kept blocks (4*D per pair forward, "
         "x{fwdbwd} forward+backward); dense SDPA counts all pairs of the real tokens; padded tokens of kept blocks "
         "count as work; warmup {warmup}, {iters} timed iterations (CUDA events); 'kernel' says what actually ran "
         "(CPU falls back to the SDPA reference). ")
MODEL_NOTES = ("Model rows (model_size): random weights, text-to-video latents, one call = one transformer forward "
               "(fwdbwd: with gradient checkpointing), speedup against diffusers' own dense processor. Triton rows: "
               "'config' is the kernel's launch config (distill/attention/triton_kernel.py DEFAULT).")
SWEEP_NOTES = ("Sweep: 'role' fwd candidate = that forward launch with the default backward, timed forward only; "
               "bwd candidate = that (dkdv, dq) pair with the default forward, timed forward+backward; chosen = the "
               "fastest correct of each, together. "
               "max_abs_diff / max_rel_diff: largest |kernel - float32 reference| over out, dq, dk, dv (relative: "
               "over the reference's largest magnitude) on fresh random inputs of 2 heads; ok = max_rel_diff < 2e-2.")


def print_table(rows: list[dict], model: list[dict]) -> None:
    """The short table printed last: kernel rows (sweep rows with their config and error), then model rows."""
    print(f"{'tokens':>8s} {'kernel':>14s} {'pass':>6s} {'density':>7s} {'ms':>9s} {'TFLOP/s':>8s} {'ratio':>6s} "
          f"{'speedup':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['tokens']:8d} {r['kernel']:>14s} {r['pass']:>6s} {r['density']:7.3f}  {r['role']}  "
                  f"{r['config']}  FAILED: {r['error']}")
            continue
        sweep = (f"  {r['role']:>13s}  {r['config']}  err {r['max_abs_diff']:.4f}{'' if r['ok'] else ' FAIL'}"
                 if "role" in r else "")
        print(f"{r['tokens']:8d} {r['kernel']:>14s} {r['pass']:>6s} {r['density']:7.3f} {r['ms']:9.3f} "
              f"{r['tflops_kept']:8.1f} {r['ratio_to_sdpa']:6.3f} {r['speedup']:7.2f}{sweep}")
    for r in model:
        print(f"{r['model_size'][:8]:>8s} {r['kernel']:>14s} {r['pass']:>6s} {r['density']:7.3f} {r['ms']:9.1f} "
              f"{'':>8s} {'':>6s} {r['speedup']:7.2f}  {r['tokens']} tokens")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes that run on CPU (a smoke test)")
    parser.add_argument("--sweep", action="store_true",
                        help="time every candidate launch config of the Triton kernel (default shape 480p)")
    parser.add_argument("--sweep-density", type=float, default=0.2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.4, 1.0],
                        help="1.0 runs the sparse kernels with every block kept (their dense rate)")
    parser.add_argument("--tile", type=int, nargs=3, default=None, help="tile (frames rows columns) in tokens")
    parser.add_argument("--shapes", nargs="+", choices=[s.name for s in FULL_SHAPES], default=None,
                        help="default: both (--sweep: 480p)")
    parser.add_argument("--model-density", type=float, default=0.2)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", help="results JSON (default eval/results/attention[_sweep]_<gpu>.json)")
    parser.add_argument("--append", action="store_true", help="add the rows to --out instead of replacing it")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if not args.quick and device.type != "cuda":
        raise SystemExit("bench_attention needs a CUDA device (or --quick for the CPU smoke test)")
    dtype = torch.float32 if args.quick else torch.bfloat16
    names = args.shapes or (["480p"] if args.sweep else [s.name for s in FULL_SHAPES])
    shapes = QUICK_SHAPES if args.quick else [s for s in FULL_SHAPES if s.name in names]
    tile = tuple(args.tile or ((1, 4, 4) if args.quick else (1, 16, 8)))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (2 if args.quick else 10)

    # FlexAttention is compiled once per shape and pass; a pattern's tensors change without recompiling, but
    # leave room so that a recompile never falls back to the unfused (N^2 memory) path
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rows, model = [], []
    for shape in shapes:
        if args.sweep:
            rows += sweep_rows(shape, args.sweep_density, tile, device, dtype, warmup, iters)
            continue
        rows += kernel_rows(shape, args.densities, tile, device, dtype, warmup, iters)
        if not args.skip_model:
            model += model_rows(shape, args.model_density, tile, device, dtype, warmup=1,
                                iters=1 if args.quick else 3)
    notes = NOTES.format(dtype=dtype, tile=list(tile), fwdbwd=1 + BWD_FACTOR, warmup=warmup, iters=iters)
    notes += SWEEP_NOTES if args.sweep else MODEL_NOTES
    out = args.out or f"eval/results/attention{'_sweep' if args.sweep else ''}_{gpu_slug(device_name(device))}.json"
    write_results(out, rows + model, device, notes, append=args.append)
    print(f"wrote {out}")
    print_table(rows, model)


if __name__ == "__main__":
    main()
