"""Quality and speed of a sampler on the synthetic domain: probe attribute accuracy against the prompts,
FVD-probe against real clips, and wall time per video (the numbers of eval/results/*.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill.attention import install_saved
from distill.conditioning import Conditioning
from distill.data.synthetic import caption, sample_labels
from distill.schedule import euler_sample
from distill.students import few_step_sample, step_subset
from distill.text import TextEncoder
from eval.probe import Probe, attribute_accuracy, fvd_probe, reference_features
from eval.results import sync
from teachers.base import Denoiser

EVAL_PROMPT_SEED = 20_241_124
Sampler = Callable[[Conditioning, Tensor], Tensor]  # (conditions, noise) -> videos in [-1, 1]


def eval_prompts(num: int, seed: int = EVAL_PROMPT_SEED) -> tuple[list[str], list[dict[str, str]]]:
    """``num`` captions with the attribute labels they state, drawn like the training data but from their own seed."""
    rng = np.random.default_rng(seed)
    labels = [sample_labels(rng) for _ in range(num)]
    return [caption(lab, rng) for lab in labels], labels


def teacher_sampler(teacher: Denoiser, steps: int, guidance: float) -> Sampler:
    """The teacher's Euler sampler with CFG; with few steps it is the naive baseline distillation must beat."""
    return lambda cond, noise: euler_sample(lambda x, t: teacher.guided(x, t, cond, guidance), noise,
                                            teacher.schedule, steps)


def student_sampler(student: Denoiser, times: list[float], deterministic: bool = False) -> Sampler:
    """A few-step student's own sampler over its step list (no guidance: it was distilled in); ``deterministic``
    for students trained on ODE phases (``"sampler": "ode"`` in method.json)."""
    return lambda cond, noise: few_step_sample(student, noise, cond, times, deterministic=deterministic)


def trained_sampler(student: Denoiser, trained: dict, steps: int | None = None) -> Sampler:
    """A trained student's sampler with ``steps`` of its step list (default: all), from its ``method.json``.

    A phased consistency student (``"sampler": "ode"``) steps its ODE deterministically from phase edge to phase
    edge, so it samples only with its own step count.
    """
    times = trained["timesteps"]
    steps = steps or len(times)
    ode = trained.get("sampler") == "ode"
    if ode and steps != len(times):
        raise ValueError(f"a phased consistency student samples only with its own {len(times)} steps, not {steps}")
    return student_sampler(student, step_subset(times, steps), deterministic=ode)


def trained_method(model_dir: str | Path) -> dict:
    """``method.json`` of a trained or exported model directory (empty for plain teachers)."""
    path = Path(model_dir) / "method.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def training_record(model: str | Path) -> dict:
    """Wall time and steps of the run that wrote ``model`` (``<output.dir>/log.jsonl`` beside ``<output.dir>/model``),
    and its job file's settings where present."""
    model = Path(model)
    log, job = model.parent / "log.jsonl", model.parent / "job.json"
    record: dict = {"train_minutes": None, "train_seconds": None, "train_steps": None}
    if log.is_file():
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        timed = [r for r in lines if "sec" in r]
        if timed:
            seconds = timed[-1]["sec"]
            record = {"train_minutes": round(seconds / 60, 2), "train_seconds": seconds,
                      "train_steps": timed[-1]["step"]}
    if job.is_file():
        settings = json.loads(job.read_text())
        record["weights"] = settings["method"]["weights"]
    return record


def load_samplers(model_dir: str | Path, device: torch.device, guidance: float, steps: Sequence[int | None] = (None,),
                  base: Denoiser | None = None, teacher_steps: int = 50) -> list[Sampler]:
    """A model directory's samplers, one per entry of ``steps`` (None: all of a student's steps), from one load:
    the one way every command loads a model directory. A student samples with its step list, a plain model with
    Euler and CFG; a causal student generates chunk by chunk with its KV cache, a LoRA student is merged into
    ``base`` (default: the base its ``lora.json`` records), and a student trained with sparse attention samples
    with it."""
    import teachers
    from distill.lora import is_lora_model, load_student

    trained = trained_method(model_dir)
    if trained.get("causal"):
        from distill.stream import generator_from_model_dir
        from eval.windows import causal_sampler

        own = len(trained["timesteps"])
        if any(s not in (None, own) for s in steps):
            raise ValueError(f"{model_dir}: a causal student samples only with its own {own} steps, not {list(steps)}")
        sampler = causal_sampler(generator_from_model_dir(model_dir, device=device))
        return [sampler for _ in steps]
    model = load_student(model_dir, base=base) if is_lora_model(model_dir) else teachers.load_spec(str(model_dir))
    model = model.to(device).eval()
    install_saved(model, model_dir)
    if "timesteps" not in trained:
        return [teacher_sampler(model, teacher_steps, guidance) for _ in steps]
    return [trained_sampler(model, trained, s) for s in steps]


def load_sampler(model_dir: str | Path, device: torch.device, guidance: float, teacher_steps: int = 50) -> Sampler:
    """A model directory's sampler with all of its steps (see :func:`load_samplers`)."""
    return load_samplers(model_dir, device, guidance, teacher_steps=teacher_steps)[0]


def generate(sampler: Sampler, captions: list[str], text_encoder: TextEncoder, shape: tuple[int, int, int, int],
             device: torch.device, batch_size: int = 64, seed: int = 0, negative_prompt: str = "",
             progress: bool = True) -> tuple[Tensor, float]:
    """Videos ``[N, C, T, H, W]`` (float32, CPU) for the captions, and the sampling wall time in seconds.

    Noise is seeded per batch, so two samplers given the same seed start from the same noise, and a stochastic
    sampler draws the same re-noising noise wherever it runs in a process. Text encoding
    is outside the timed region; a warm-up call precedes it.
    """
    negative, negative_mask = text_encoder.encode([negative_prompt])
    videos, seconds = [], 0.0
    for start in tqdm(range(0, len(captions), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = captions[start:start + batch_size]
        text, mask = text_encoder.encode(chunk)
        cond = Conditioning(text, mask, negative.expand(len(chunk), -1, -1), negative_mask.expand(len(chunk), -1))
        cond = cond.to(device)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        noise = torch.randn(len(chunk), *shape, generator=generator).to(device)
        with torch.no_grad():
            if start == 0:
                sampler(cond.index(slice(0, 1)), noise[:1])  # warm-up: kernels, allocator, caches
            torch.manual_seed(seed * 1_000_003 + start)  # samplers that re-noise draw from the global generator
            sync(device)
            began = time.perf_counter()
            video = sampler(cond, noise)
            sync(device)
        seconds += time.perf_counter() - began
        videos.append(video.float().clamp(-1, 1).cpu())
    return torch.cat(videos), seconds


def evaluate(sampler: Sampler, probe: Probe, text_encoder: TextEncoder, num: int, device: torch.device,
             frames: int = 16, height: int = 32, width: int = 32, batch_size: int = 64, seed: int = 0,
             real_features: Tensor | None = None) -> dict:
    """Accuracy (mean over attributes), per-attribute accuracy, FVD-probe and seconds per video for one sampler."""
    captions, labels = eval_prompts(num)
    videos, seconds = generate(sampler, captions, text_encoder, (3, frames, height, width), device, batch_size, seed)
    if real_features is None:
        real_features = reference_features(probe, num, frames, height, width)
    accuracy = attribute_accuracy(probe.predict(videos), labels)
    return {"accuracy": round(accuracy["mean"], 4),
            "accuracy_per_attribute": {k: round(v, 4) for k, v in accuracy.items() if k != "mean"},
            "fvd_probe": round(fvd_probe(probe, videos, real_features), 3),
            "sec_per_video": round(seconds / num, 5), "num_videos": num, "batch_size": batch_size,
            "videos": videos}


def teacher_run(spec: str, steps: int, guidance: float, device: torch.device, **fields) -> tuple[dict, Sampler]:
    """The reference row of a comparison: the teacher named by ``spec`` with its many-step Euler sampler and CFG."""
    import teachers

    teacher = teachers.load_spec(spec).to(device).eval()
    return ({"model": "teacher", "method": "flow", "steps": steps, **fields},
            teacher_sampler(teacher, steps, guidance))


def evaluate_runs(runs: list[tuple[dict, Sampler]], probe: Probe, text_encoder: TextEncoder, num: int,
                  device: torch.device, size: tuple[int, int, int], batch_size: int, real_features: Tensor
                  ) -> list[dict]:
    """One results row per ``(fields, sampler)``: every sampler on the same prompts and noise, printed as it ends."""
    rows = []
    for fields, sampler in runs:
        result = evaluate(sampler, probe, text_encoder, num, device, *size, batch_size, real_features=real_features)
        result.pop("videos")
        rows.append({**fields, **result})
        print(f"{fields['model']:16s} {fields['method']:8s} steps={fields['steps']:3d}  accuracy={result['accuracy']:.3f}"
              f"  fvd_probe={result['fvd_probe']:9.3f}  sec/video={result['sec_per_video']:.4f}")
    return rows
