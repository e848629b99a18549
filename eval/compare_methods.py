"""Compare distillation methods on the tiny domain: every trained student at 1, 2 and 4 steps (where its step list
allows), beside the teacher's many-step sampler, with probe accuracy, FVD-probe, sampling time and the training
wall time that produced it. Writes ``eval/results/methods_tiny.json`` and prints a markdown table for README.

    python -m eval.compare_methods runs/methods/*/model --steps 1 2 4 --num 512 --out eval/results/methods_tiny.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distill.text import TextEncoder
from eval.evaluate import evaluate_runs, load_samplers, teacher_run, trained_method, training_record
from eval.probe import Probe, reference_features
from eval.results import write_results


def model_dir(path: str | Path) -> Path:
    """A trained student's directory: ``path`` itself, or ``path/model`` for a job's output directory."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "method.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no method.json here or in {path / 'model'} (a directory from distill train)")


def eval_steps(method: dict, wanted: list[int]) -> list[int]:
    """The step counts of ``wanted`` a student can sample with: evenly spaced subsets of its step list, and only its
    own count for a phased (ODE-sampled) student, whose outputs are consistent only edge to edge."""
    times = method["timesteps"]
    if method.get("sampler") == "ode":
        return [len(times)] if len(times) in wanted else []
    return [s for s in wanted if s <= len(times) and len(times) % s == 0]


def markdown(rows: list[dict], teacher_fvd: float | None) -> str:
    lines = ["| model | method | steps | accuracy | FVD-probe | x teacher | sec/video | train min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['fvd_probe'] / teacher_fvd:.2f}" if teacher_fvd else "-"
        minutes = "-" if r.get("train_minutes") is None else f"{r['train_minutes']:.1f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['steps']} | {r['accuracy']:.3f} | {r['fvd_probe']:.1f} | "
                     f"{ratio} | {r['sec_per_video']:.4f} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="trained student directories (or the jobs' output directories)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--teacher", default="tiny", help="the reference teacher: 'tiny' or a model directory")
    parser.add_argument("--teacher-steps", type=int, default=50, help="0: no teacher row")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--num", type=int, default=512, help="videos per row")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="eval/results/methods_tiny.json")
    parser.add_argument("--append", action="store_true",
                        help="add these rows to --out (with --teacher-steps 0: same prompts, same real clips)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    probe, encoder = Probe.load(device=device), TextEncoder.from_pretrained(device=device)
    real = reference_features(probe, args.num, args.frames, args.height, args.width)
    runs = [teacher_run(args.teacher, args.teacher_steps, args.guidance, device, train_minutes=None)
            ] if args.teacher_steps else []
    for path in args.models:
        directory = model_dir(path)
        method, record = trained_method(directory), training_record(directory)
        name = directory.parent.name if directory.name == "model" else directory.name
        counts = eval_steps(method, args.steps)
        for steps, sampler in zip(counts, load_samplers(directory, device, args.guidance, counts)):
            runs.append(({"model": name, "method": method["method"], "steps": steps,
                          "trained_steps": len(method["timesteps"]), "dir": str(directory), **record}, sampler))
    rows = evaluate_runs(runs, probe, encoder, args.num, device, (args.frames, args.height, args.width),
                         args.batch_size, real)
    notes = (f"{args.num} prompts from eval.evaluate.eval_prompts (seed fixed), batch {args.batch_size}; FVD-probe "
             f"against {args.num} unseen real clips; teacher: {args.teacher} with {args.teacher_steps} Euler steps and "
             f"guidance {args.guidance}; students sample without guidance at subsets of their step list (phased "
             "consistency students only at their own count); train_minutes: wall time of the training loop from the "
             "run's log.jsonl (startup, data pool and export excluded).")
    write_results(args.out, rows, device, notes, append=args.append)
    teacher_fvd = rows[0]["fvd_probe"] if args.teacher_steps else None
    print(f"wrote {args.out}\n")
    print(markdown(rows, teacher_fvd))
    return rows


if __name__ == "__main__":
    main()
