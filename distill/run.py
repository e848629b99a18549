"""Build a job's parts from its config and run it: the code behind ``distill train``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

import losses
import teachers
from distill import attention
from distill.config import ConfigError, JobConfig
from distill.data.batches import BatchSource
from distill.schedule import make_schedule
from distill.text import TextEncoder
from distill.trainer import Trainer, init_distributed, resolve_device
from losses.base import Method, Networks
from teachers.base import Denoiser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(job: JobConfig, dtype: torch.dtype = torch.float32) -> Denoiser:
    """The job's model (a teacher to train or to distil) with the job's schedule, and with coordinate and clip-offset
    input channels when ``model.coordinates`` and ``model.offsets`` ask for them (zero-initialised where the loaded
    model has none)."""
    from teachers.wan import WanDenoiser

    schedule = make_schedule(job.schedule.kind, shift=job.schedule.shift)
    source = job.model.config or job.model.source or None  # shipped families (tiny) need no source
    model = teachers.load(job.model.family, source, schedule=schedule, dtype=dtype)
    for key, attribute, widen in (("coordinates", "coordinate_frames", "with_coordinates"),
                                  ("offsets", "offset_frames", "with_offsets")):
        frames = getattr(job.model, key)
        if not frames:
            continue
        if not isinstance(model, WanDenoiser):
            raise ConfigError(f"model.{key} = {frames}: extra input channels exist for Wan models only, "
                              f"family {job.model.family!r} is a {type(model).__name__}")
        has = getattr(model, attribute)
        if not has:
            model = getattr(model, widen)(frames)
        elif has != frames:
            raise ConfigError(f"model.{key} = {frames}, but the loaded model's channels are scaled to {has} frames; "
                              f"set model.{key} = {has} (or 0: a model keeps the channels it has)")
    return model


def generator_skeleton(job: JobConfig) -> Denoiser:
    """A model of the generator's architecture to export its weights with: the student's ``init`` where it starts
    from one (its inputs may differ from the teacher's: ``distill.causal.make_causal_student``), else the job's
    model."""
    if not (job.student.causal and job.student.init):
        return build_model(job)
    from teachers.wan import WanDenoiser

    return WanDenoiser.from_pretrained(job.student.init, make_schedule(job.schedule.kind, shift=job.schedule.shift))


def build_networks(job: JobConfig, method: Method, device: torch.device) -> tuple[Networks, Networks]:
    """The method's ``(trainable, frozen)`` networks, frozen ones on ``device`` in ``model.dtype``; with
    ``lora.rank`` > 0 the trainable ones are adapters on one shared frozen base (distill/lora.py)."""
    if job.lora.rank:
        from distill.lora import lora_networks

        trainable, frozen = lora_networks(method, build_model(job), job.lora, device, DTYPES[job.model.dtype])
    else:
        trainable, frozen = method.networks(build_model(job))
    attention.apply_to_roles(job.attention, {**trainable, **frozen})  # sparse attention (distill/attention)
    for net in frozen.values():
        net.requires_grad_(False).eval().to(device=device, dtype=DTYPES[job.model.dtype])
    return trainable, frozen


def train(job: JobConfig) -> Path:
    """Run a training job to its last step and export the generator (EMA weights where kept).

    Returns the exported model directory (``<output.dir>/model``).
    """
    device = resolve_device(job.train.device)
    init_distributed(device)
    torch.manual_seed(job.train.seed)
    method = losses.build(job)
    trainable, frozen = build_networks(job, method, device)
    text_encoder = TextEncoder.from_pretrained(device=device)
    batches = BatchSource(job.data, text_encoder, device, seed=job.train.seed, rank=dist.get_rank())
    trainer = Trainer(job, method, trainable, frozen, batches, device)
    try:
        trainer.fit()
        weights = trainer.generator_weights(ema=True)
    finally:
        trainer.close()
    out = Path(job.output.dir) / "model"
    if dist.get_rank() == 0 and job.lora.rank:
        from distill.lora import save_lora_model

        save_lora_model(out, weights, job, DTYPES[job.output.dtype])
    elif dist.get_rank() == 0:
        generator = generator_skeleton(job)
        generator.load_state_dict(weights)
        generator.save_pretrained(out, dtype=DTYPES[job.output.dtype])
    if dist.get_rank() == 0:
        (out / "method.json").write_text(json.dumps(method.describe(), indent=1))
        if job.attention.active and "generator" in job.attention.roles:
            attention.save_spec(job.attention, out)  # loaders re-install the pattern the student was trained with
    dist.barrier()
    return out
