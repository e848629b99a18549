"""Attention backends on a GPU: dense SDPA, FlexAttention and the project's Triton block-sparse kernel under
sliding tile windows at several densities, forward and forward+backward, at Wan's 480p and 720p token counts;
then the Wan 1.3B-size transformer (random weights) end to end with each backend.

Rates are effective TFLOP/s on kept blocks: 4*D FLOPs per kept (query, key) pair per head for the forward,
2.5 times that for the backward (FlashAttention's convention), divided by the measured time. Dense SDPA's
rate counts all N^2 pairs of the real (unpadded) tokens. ``--quick`` runs tiny sizes (on CPU, where the
sparse backends fall back to the SDPA reference) so that the script is known to run.

    python eval/bench_attention.py                 # GPU: writes eval/results/attention_<gpu>.json
    python eval/bench_attention.py --quick --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from distill.attention import AttentionSpec, BlockSparse, TileLayout, install, patterns, uninstall
from distill.attention.backends import get_backend
from distill.attention.triton_kernel import runs_on
from eval.results import device_name, write_results

BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs (5 matmuls against 2)


@dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int, int]  # latent-patch tokens (frames, rows, columns)
    heads: int
    head_dim: int


FULL_SHAPES = [Shape("480p", (21, 30, 52), 12, 128), Shape("720p", (21, 45, 80), 12, 128)]
QUICK_SHAPES = [Shape("quick", (4, 8, 10), 2, 16)]  # columns padded 10 -> 12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def attention_call(backend: str, q, k, v, sparse: BlockSparse | None, passes: str) -> Callable[[], object]:
    """One timed call: forward only, or forward and backward (gradients of q, k, v)."""
    fn = get_backend(backend)
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
    if backend == "triton" and (not sparse or not runs_on(torch.empty(0, device=device))):
        return "sdpa-reference"
    if backend == "flex" and device.type == "cpu" and passes == "fwdbwd":
        return "sdpa-reference"
    return backend


def kernel_rows(shape: Shape, densities: list[float], tile: tuple[int, int, int], device: torch.device,
                dtype: torch.dtype, warmup: int, iters: int) -> list[dict]:
    """Dense SDPA, then flex and triton at each density, forward and forward+backward."""
    layout = TileLayout(shape.grid, tile)
    h, d = shape.heads, shape.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    dense = [torch.randn(1, h, layout.tokens, d, device=device, dtype=dtype, generator=g).requires_grad_()
             for _ in range(3)]
    # tile-major [B, N, H, D] memory seen as [B, H, N, D]: what the Wan processor passes (and FlexAttention,
    # compiled for these strides here, is reused by the model rows)
    tiled = [layout.to_tiles(x.detach().transpose(1, 2)).transpose(1, 2).requires_grad_() for x in dense]
    key_valid = layout.key_valid(device)
    rows, base = [], dict(tokens=layout.tokens, padded_tokens=layout.padded_tokens, heads=h, head_dim=d,
                          grid=list(shape.grid), tile=list(tile), dtype=str(dtype).replace("torch.", ""))
    sdpa_rate, sdpa_ms = {}, {}
    for kernel in ["default"] + (list(SDPA_KERNELS) if device.type == "cuda" else []):
        for passes in ("fwd", "fwdbwd"):
            flops = 4 * layout.tokens ** 2 * d * h * (1 + (BWD_FACTOR if passes == "fwdbwd" else 0))
            try:
                with sdpa_kernel(kernel):
                    ms = time_ms(attention_call("sdpa", *dense, None, passes), device, warmup, iters)
            except RuntimeError as err:  # this build or GPU lacks that SDPA kernel
                print(f"sdpa {kernel}: skipped ({str(err).splitlines()[0][:80]})")
                continue
            rate = flops / ms / 1e9
            if kernel == "default":
                sdpa_rate[passes], sdpa_ms[passes] = rate, ms
            rows.append(dict(base, backend="sdpa", kernel=f"sdpa-{kernel}", density=1.0, window=None,
                             **{"pass": passes}, ms=round(ms, 3), tflops_kept=round(rate, 1),
                             ratio_to_sdpa=round(rate / sdpa_rate[passes], 3),
                             speedup=round(sdpa_ms[passes] / ms, 2)))
    for target in densities:
        window, density = window_for_density(layout.tiles, target)
        keep = patterns.sliding_tile(layout.tiles, window, device)
        sparse = BlockSparse(keep, layout.block, key_valid)
        kept_pairs = int(keep.sum().item()) * layout.block ** 2
        with torch.no_grad():  # the two sparse backends must agree before their times mean anything
            outs = [get_backend(b)(*[x.detach() for x in tiled], sparse, d ** -0.5) for b in ("flex", "triton")]
            max_diff = (outs[0].float() - outs[1].float()).abs().max().item()
        for backend in ("flex", "triton"):
            for passes in ("fwd", "fwdbwd"):
                flops = 4 * kept_pairs * d * h * (1 + (BWD_FACTOR if passes == "fwdbwd" else 0))
                ms = time_ms(attention_call(backend, *tiled, sparse, passes), device, warmup, iters)
                rate = flops / ms / 1e9
                rows.append(dict(base, backend=backend, kernel=what_ran(backend, device, passes, True),
                                 target_density=target, density=round(density, 4), window=list(window),
                                 **{"pass": passes}, ms=round(ms, 3), tflops_kept=round(rate, 1),
                                 ratio_to_sdpa=round(rate / sdpa_rate[passes], 3),
                                 speedup=round(sdpa_ms[passes] / ms, 2),
                                 max_diff_flex_vs_triton=round(max_diff, 5)))
    return rows


def model_rows(preset: str, latents: tuple[int, int, int, int], text_len: int, density: float,
               tile: tuple[int, int, int], device: torch.device, dtype: torch.dtype, warmup: int,
               iters: int) -> list[dict]:
    """The Wan transformer (random weights) forward and forward+backward (gradient checkpointing on) with
    dense SDPA and with a sliding tile window of about ``density`` through flex and triton."""
    import teachers
    from distill.conditioning import Conditioning

    model = teachers.load("wan", preset, dtype=dtype).to(device)
    cfg = model.config
    grid = tuple(n // p for n, p in zip(latents[1:], cfg.patch_size))
    layout = TileLayout(grid, tile)
    window, actual = window_for_density(layout.tiles, density)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, *latents, device=device, generator=g)
    cond = Conditioning(torch.randn(1, text_len, cfg.text_dim, device=device, generator=g))
    t = torch.tensor([0.7], device=device)
    runs = [("sdpa", "dense", None, 1.0)] + [(b, "tile", list(window), actual) for b in ("flex", "triton")]
    rows, dense_ms = [], {}
    for backend, pattern, win, dens in runs:
        if win is None:
            uninstall(model)  # diffusers' own processor: the dense baseline
        else:
            install(model, AttentionSpec(backend=backend, pattern=pattern, tile=list(tile), window=win))
        for passes in ("fwd", "fwdbwd"):
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
                             model_size=preset, latents=list(latents), tokens=layout.tokens, density=round(dens, 4),
                             window=win, tile=list(tile), **{"pass": passes}, ms=round(ms, 1),
                             speedup=round(dense_ms[passes] / ms, 2), gradient_checkpointing=passes == "fwdbwd"))
        model.transformer.disable_gradient_checkpointing()
        model.zero_grad(set_to_none=True)
    return rows


def gpu_slug(device: torch.device) -> str:
    name = device_name(device)
    found = re.search(r"\b([A-Z]\d{2,4})\b", name)
    return (found.group(1) if found else re.sub(r"\W+", "_", name)).lower()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes that run on CPU (a smoke test)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.4, 1.0],
                        help="1.0 runs the sparse kernels with every block kept (their dense rate)")
    parser.add_argument("--tile", type=int, nargs=3, default=None, help="tile (frames rows columns) in tokens")
    parser.add_argument("--shapes", nargs="+", default=None, help="subset of 480p 720p")
    parser.add_argument("--model-density", type=float, default=0.2)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", help="results JSON (default eval/results/attention_<gpu>.json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if not args.quick and device.type != "cuda":
        raise SystemExit("bench_attention needs a CUDA device (or --quick for the CPU smoke test)")
    dtype = torch.float32 if args.quick else torch.bfloat16
    shapes = QUICK_SHAPES if args.quick else [s for s in FULL_SHAPES if args.shapes is None or s.name in args.shapes]
    tile = tuple(args.tile or ((1, 4, 4) if args.quick else (1, 16, 8)))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (2 if args.quick else 10)

    # FlexAttention is compiled once per shape and pass; a pattern's tensors change without recompiling, but
    # leave room so that a recompile never falls back to the unfused (N^2 memory) path
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rows = []
    for shape in shapes:
        rows += kernel_rows(shape, args.densities, tile, device, dtype, warmup, iters)
    model = []
    if not args.skip_model:
        preset, latents, text_len = (("tiny-random", (3, 2, 16, 16), 8) if args.quick
                                     else ("wan2.1-t2v-1.3b", (16, 21, 60, 104), 512))
        model = model_rows(preset, latents, text_len, args.model_density, tile, device, dtype,
                           warmup=1, iters=1 if args.quick else 3)
    notes = (f"batch 1, {dtype}; sliding tile windows (tile {list(tile)} tokens) chosen to hit the target densities, "
             "'density' = kept tile pairs / all tile pairs of the padded grid; tflops_kept counts kept blocks "
             f"(4*D per pair forward, x{1 + BWD_FACTOR} forward+backward); dense SDPA counts all pairs of the real "
             f"tokens; padded tokens of kept blocks count as work; warmup {warmup}, {iters} timed iterations (CUDA "
             "events). Model rows (model_size): random weights, text-to-video latents, one call = one transformer "
             "forward (fwdbwd: with gradient checkpointing), speedup against diffusers' own dense processor; "
             "'kernel' says what actually ran (CPU falls back to the SDPA reference).")
    out = args.out or f"eval/results/attention_{gpu_slug(device)}.json"
    write_results(out, rows + model, device, notes)
    print(f"wrote {out}")
    print(f"{'tokens':>8s} {'kernel':>14s} {'pass':>6s} {'density':>7s} {'ms':>9s} {'TFLOP/s':>8s} {'ratio':>6s} "
          f"{'speedup':>7s}")
    for r in rows:
        print(f"{r['tokens']:8d} {r['kernel']:>14s} {r['pass']:>6s} {r['density']:7.3f} {r['ms']:9.3f} "
              f"{r['tflops_kept']:8.1f} {r['ratio_to_sdpa']:6.3f} {r['speedup']:7.2f}")
    for r in model:
        print(f"{r['model_size'][:8]:>8s} {r['kernel']:>14s} {r['pass']:>6s} {r['density']:7.3f} {r['ms']:9.1f} "
              f"{'':>8s} {'':>6s} {r['speedup']:7.2f}")


if __name__ == "__main__":
    main()
