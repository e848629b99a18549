"""Several few-step students side by side on the synthetic domain (probe accuracy, FVD-probe, seconds per
video), with the teacher's many-step sampler as the reference row: e.g. a sparse-attention student next to
its dense twin (eval/results/sparse_tiny.json).

    python -m eval.compare_students --student sparse=runs/sparse_tiny_dmd/model \\
        --student dense=runs/sparse_tiny_dense/model --out eval/results/sparse_tiny.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from distill.attention import TileLayout, load_spec
from distill.attention.processor import block_pattern
from distill.attention.spec import AttentionSpec
from eval.evaluate import evaluate_runs, load_samplers, teacher_run, trained_method
from eval.results import write_results


def pattern_fields(spec: AttentionSpec | None, patch_size: tuple[int, int, int], frames: int, height: int,
                   width: int) -> dict:
    """The attention a student samples with: backend, pattern and its density at this clip size (svg chooses
    per call, so it has none)."""
    if spec is None:
        return {"attention": "dense", "density": 1.0}
    grid = tuple(n // p for n, p in zip((frames, height, width), patch_size))
    fields = {"attention": f"{spec.backend}:{spec.pattern}", "tile": spec.tile, "window": spec.window}
    if spec.pattern in ("dense", "svg"):
        return {**fields, "density": 1.0 if spec.pattern == "dense" else None}
    keep = block_pattern(spec, TileLayout(grid, tuple(spec.tile)))
    return {**fields, "density": round(keep.float().mean().item(), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="append", required=True, metavar="NAME=DIR",
                        help="a trained student directory (with method.json), repeatable")
    parser.add_argument("--student-steps", type=int, nargs="+", default=[4])
    parser.add_argument("--teacher", default="tiny")
    parser.add_argument("--teacher-steps", type=int, default=50, help="0 skips the teacher row")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--num", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from distill.text import TextEncoder
    from eval.probe import Probe, reference_features

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    students = []
    for item in args.student:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "method.json").is_file():
            raise SystemExit(f"--student {item!r}: expected NAME=DIR with DIR a trained student (method.json)")
        students.append((name, Path(path)))
    size = (args.frames, args.height, args.width)
    probe = Probe.load(device=device)
    encoder = TextEncoder.from_pretrained(device=device)
    real = reference_features(probe, args.num, *size)
    runs = [teacher_run(args.teacher, args.teacher_steps, args.guidance, device, guidance=args.guidance,
                        attention="dense", density=1.0)] if args.teacher_steps else []
    for name, path in students:
        method = trained_method(path)["method"]
        patch = tuple(json.loads((path / "config.json").read_text())["patch_size"])
        fields = pattern_fields(load_spec(path), patch, *size)
        samplers = load_samplers(path, device, args.guidance, args.student_steps)  # with its trained attention
        runs += [({"model": name, "method": method, "steps": steps, "path": str(path), **fields}, sampler)
                 for steps, sampler in zip(args.student_steps, samplers)]
    rows = evaluate_runs(runs, probe, encoder, args.num, device, size, args.batch_size, real)
    notes = (f"{args.num} prompts from eval.evaluate.eval_prompts (seed fixed), same noise for every sampler, batch "
             f"{args.batch_size}; FVD-probe against {args.num} unseen real clips; students sample with the attention "
             "they were trained with (attention.json); 'density' = kept tile pairs of the pattern at this clip size.")
    write_results(args.out, rows, device, notes)
    print(f"wrote {args.out}")
    print(f"{'model':10s} {'steps':>5s} {'attention':>16s} {'density':>7s} {'accuracy':>9s} {'fvd_probe':>10s}")
    for row in rows:
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        print(f"{row['model']:10s} {row['steps']:5d} {row['attention']:>16s} {density:>7s} {row['accuracy']:9.3f} "
              f"{row['fvd_probe']:10.3f}")


if __name__ == "__main__":
    main()
