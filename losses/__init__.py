"""Distillation objectives. ``build`` turns a job's method table into a Method.

Combinations are weights, not classes: ``method.weights.gan > 0`` adds the GAN term of losses/adversarial.py and
its ``discriminator`` role to the base method named by ``method.name`` (``dmd`` + GAN is DMD2, ``cd`` + GAN is
consistency with an adversarial term as in OSV/MCM/PCM); ``method.name = "gan"`` is the GAN term alone.
"""

from __future__ import annotations

from distill.config import JobConfig
from losses.base import Method

NAMES = ("cd", "dmd", "flow", "gan", "regression")


def _base(job: JobConfig, weights: dict[str, float]):
    """The method named by ``job.method.name``, with its own loss weights."""
    from distill.schedule import make_schedule

    name, method = job.method.name, job.method
    schedule = make_schedule(job.schedule.kind, shift=job.schedule.shift)
    times = schedule.timesteps(method.student_steps)[:-1].tolist()
    if name == "dmd":
        from losses.causal_dmd import CausalDMDMethod
        from losses.dmd import DMDMethod

        causal = {"student": job.student, "data": job.data} if job.student.causal else {}
        return (CausalDMDMethod if causal else DMDMethod)(
            times=times, guidance=method.guidance, t_min=method.t_min, t_max=method.t_max,
            time_distribution=job.schedule.time_distribution, weights=weights or {"dmd": 1.0}, **causal)
    if name == "regression":
        from losses.regression import RegressionMethod

        return RegressionMethod(times=times, student=job.student, data=job.data)
    if name == "cd":
        from losses.consistency import ConsistencyMethod
        from losses.perceptual import load_lpips

        cd = method.consistency
        lpips = load_lpips(cd.lpips_path, cd.lpips_net) if weights.get("lpips", 0.0) > 0 else None
        return ConsistencyMethod(grid=schedule.timesteps(cd.teacher_steps).tolist(), phases=method.student_steps,
                                 skip=cd.skip, guidance=method.guidance, distance=cd.distance, huber_c=cd.huber_c,
                                 target_decay=cd.target_decay, weights=weights or {"cd": 1.0}, lpips=lpips)
    if name == "gan":
        from losses.adversarial import RolloutGenerator

        if weights:
            raise ValueError(f"method.weights: a pure GAN job has only the 'gan' term, got {sorted(weights)}")
        return RolloutGenerator(times=times)
    raise ValueError(f"unknown method {name!r}; known: {list(NAMES)}")


def build(job: JobConfig) -> Method:
    """The Method named by ``job.method.name``, plus the GAN term where ``method.weights.gan > 0``."""
    name = job.method.name
    if name == "flow":
        from losses.flow_matching import FlowMatchingMethod

        return FlowMatchingMethod(time_distribution=job.schedule.time_distribution,
                                  cfg_dropout=job.method.cfg_dropout)
    weights = dict(job.method.weights)
    gan_weight = weights.pop("gan", 1.0 if name == "gan" else 0.0)
    base = _base(job, weights)
    if gan_weight <= 0:
        if name == "gan":
            raise ValueError("method.name = 'gan' needs method.weights.gan > 0")
        return base
    from losses.adversarial import Adversarial, WithGAN

    adv = job.method.adversarial
    gan = Adversarial(backbone=adv.backbone, layers=adv.layers, kind=adv.loss, r1_weight=adv.r1_weight,
                      r1_sigma=adv.r1_sigma, t_min=job.method.t_min, t_max=job.method.t_max,
                      time_distribution=job.schedule.time_distribution)
    return WithGAN(base, gan, gan_weight, "gan" if name == "gan" else f"{name}+gan")


__all__ = ["Method", "NAMES", "build"]
