"""Peak GPU memory and step time of one DMD2 step (critic update + generator update) through the real
Trainer: full fine-tuning (teacher, generator and critic as three networks) against LoRA (adapters on one
frozen base), DeepSpeed ZeRO-2 on one GPU, bf16, gradient checkpointing, random weights of the Wan2.1 1.3B
transformer at 81 frames of 480x832 (latents 16 x 21 x 60 x 104) with random umT5-shaped text (512 x 4096).

Each mode runs in its own process, so that one mode's memory does not count against the other.

    python eval/bench_memory.py                    # GPU: writes eval/results/memory_<gpu>.json
    python eval/bench_memory.py --tiny --out X     # CPU smoke run on the tiny random preset (peak RSS)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from the repo root

from distill.conditioning import Batch, Conditioning  # noqa: E402
from eval.results import sync  # noqa: E402

# (preset, latent shape [C, T, H, W], text tokens, text dim, model dtype, precision, device)
SIZES = {
    "wan2.1-t2v-1.3b": ("wan2.1-t2v-1.3b", (16, 21, 60, 104), 512, 4096, "bfloat16", "bf16", "cuda"),
    "tiny": ("tiny-random", (3, 2, 16, 16), 16, 384, "float32", "fp32", "cpu"),
}
RESULT_TAG = "BENCH_RESULT "


class RandomPrompts:
    """Prompt-only batches of random text embeddings (DMD needs no data latents); the Trainer's ``get``."""

    def __init__(self, shape: tuple[int, ...], tokens: int, dim: int, device: torch.device, dtype: torch.dtype):
        g = torch.Generator().manual_seed(0)
        text = torch.randn(shape[0], tokens, dim, generator=g).to(device, dtype)
        mask = torch.ones(shape[0], tokens, dtype=torch.bool, device=device)
        self.batch = Batch(None, Conditioning(text, mask, torch.zeros_like(text), mask), [""] * shape[0],
                           [{}] * shape[0], shape)

    def get(self, index: int) -> Batch:
        return self.batch


def job_overrides(size: str, mode: str, rank: int, out: str) -> list[str]:
    preset, latent, _, _, dtype, precision, device = SIZES[size]
    channels, frames, height, width = latent
    overrides = [f"model.source='{preset}'", f"model.dtype='{dtype}'", "model.gradient_checkpointing=true",
                 "schedule.shift=3.0", "schedule.time_distribution='uniform'", "data.kind='synthetic'",
                 f"data.channels={channels}", f"data.frames={frames}", f"data.height={height}",
                 f"data.width={width}", "data.batch_size=1", "method.name='dmd'", "method.critic_steps=1",
                 "method.student_steps=4", "optim.lr=1e-5", "deepspeed.zero_stage=2",
                 f"deepspeed.precision='{precision}'", f"train.device='{device}'", "train.steps=1000000",
                 "train.checkpoint_every=1000000", "logging.tensorboard=false", "logging.progress=false",
                 f"output.dir='{out}'", "output.resume=false"]
    return overrides + ([f"lora.rank={rank}", f"lora.alpha={rank}"] if mode == "lora" else [])


def measure(size: str, mode: str, rank: int, steps: int, warmup: int) -> dict:
    """One mode in this process: build through ``distill.run``, time ``Trainer.train_step``."""
    import losses
    from distill.config import load_job
    from distill.run import DTYPES, build_networks
    from distill.trainer import Trainer, init_distributed, resolve_device

    with tempfile.TemporaryDirectory() as out:
        job = load_job(None, job_overrides(size, mode, rank, out))
        device = resolve_device(job.train.device)
        init_distributed(device)
        torch.manual_seed(0)
        method = losses.build(job)
        trainable, frozen = build_networks(job, method, device)
        _, _, tokens, dim, dtype, _, _ = SIZES[size]
        shape = (job.data.batch_size, job.data.channels, job.data.frames, job.data.height, job.data.width)
        trainer = Trainer(job, method, trainable, frozen, RandomPrompts(shape, tokens, dim, device, DTYPES[dtype]),
                          device)
        trained = sum(p.numel() for e in trainer.engines.values() for p in e.module.parameters())
        seconds, error = [], None
        try:
            for i in range(warmup + steps):
                sync(device)
                start = time.perf_counter()
                trainer.train_step()
                sync(device)
                if i >= warmup:
                    seconds.append(time.perf_counter() - start)
        except torch.OutOfMemoryError as err:  # a result too: this mode does not fit this device
            error = f"out of memory: {str(err).splitlines()[0]}"
        trainer.close()
    patch = (1, 2, 2)
    row = {"model_size": size, "mode": mode, "zero_stage": 2, "lora_rank": rank if mode == "lora" else None,
           "step_s": round(sum(seconds) / len(seconds), 4) if seconds else None,
           "step_s_each": [round(s, 4) for s in seconds], "error": error,
           "tokens": shape[2] // patch[0] * (shape[3] // patch[1]) * (shape[4] // patch[2]),
           "latent_shape": list(shape), "trainable_params": trained, "critic_steps": job.method.critic_steps,
           "gradient_checkpointing": True, "precision": job.deepspeed.precision}
    if device.type == "cuda":
        row.update(peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                   reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 3), memory="cuda max allocated")
    else:  # the process's peak resident set (Linux reports KiB)
        row.update(peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                   memory="cpu peak RSS")
    return row


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """``measure`` in a fresh process (its own process group, its own memory peak)."""
    inherited = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--size", args.size,
               "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len(RESULT_TAG):])
    sys.stderr.write(f"{mode} run failed (exit {done.returncode}):\n{done.stderr[-4000:]}\n")
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]  # e.g. an out-of-memory while building
    return {"model_size": args.size, "mode": mode, "zero_stage": 2, "peak_gib": None, "step_s": None,
            "trainable_params": None, "error": f"exit {done.returncode}: {last[:300]}"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny random preset on the CPU (a smoke run)")
    parser.add_argument("--size", choices=sorted(SIZES), default="wan2.1-t2v-1.3b")
    parser.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank)")
    parser.add_argument("--steps", type=int, default=3, help="timed DMD steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed DMD steps first (optimizer state, kernels)")
    parser.add_argument("--out", help="results JSON (default eval/results/memory_<gpu>.json)")
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    if args.child:
        print(RESULT_TAG + json.dumps(measure(args.size, args.child, args.rank, args.steps, args.warmup)), flush=True)
        return
    device = torch.device(SIZES[args.size][6])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--size {args.size} needs a CUDA device (use --tiny on a CPU)")
    from eval.results import device_name, gpu_slug, write_results

    rows = [run_mode(args, mode) for mode in args.modes]
    name = device_name(device)
    out = args.out or f"eval/results/memory_{gpu_slug(name) if device.type == 'cuda' else 'cpu'}.json"
    _, _, tokens, dim, dtype, _, _ = SIZES[args.size]
    memory = "cuda max allocated" if device.type == "cuda" else "cpu peak RSS"
    notes = (f"One DMD2 step = 1 critic update + 1 generator update (student rollout to a random step of 4, "
             f"teacher with CFG), batch 1, random weights and random text embeddings ({tokens} x {dim}); "
             f"{args.warmup} warm-up step(s), step_s = mean of {args.steps}. Same seed in both modes, so they run "
             f"the same rollout depths. peak_gib: {memory} over the whole process (model build, engines, steps). "
             f"LoRA: rank {args.rank} on attention q/k/v/out and FFN linears, generator and critic adapters on one "
             f"frozen {dtype} base.")
    write_results(out, rows, device, notes)
    print(f"wrote {out}")
    print(f"{'mode':6s} {'peak_gib':>9s} {'step_s':>8s} {'trainable':>12s}")
    for row in rows:
        peak, step, params = (f"{row[k]:{f}}" if row.get(k) is not None else "failed" for k, f in
                              (("peak_gib", ".2f"), ("step_s", ".3f"), ("trainable_params", "d")))
        error = f"  {row['error']}" if row.get("error") else ""
        print(f"{row['mode']:6s} {peak:>9s} {step:>8s} {params:>12s}{error}")
    if len(rows) == 2 and all(row["step_s"] for row in rows):
        memory, time_ratio = rows[1]["peak_gib"] / rows[0]["peak_gib"], rows[1]["step_s"] / rows[0]["step_s"]
        print(f"lora / full: memory {memory:.2f}x, step time {time_ratio:.2f}x (issue 8's targets: LoRA peak under "
              f"24 GiB, step time within 1.3x)")


if __name__ == "__main__":
    main()
