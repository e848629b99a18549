"""Distillation objectives. ``build`` turns a job's method table into a Method."""

from __future__ import annotations

from distill.config import JobConfig
from losses.base import Method


def build(job: JobConfig) -> Method:
    """The Method named by ``job.method.name``."""
    name = job.method.name
    if name == "regression" or (name == "dmd" and job.student.causal):
        return _causal_or_regression(job)
    if name == "flow":
        from losses.flow_matching import FlowMatchingMethod

        return FlowMatchingMethod(time_distribution=job.schedule.time_distribution,
                                  cfg_dropout=job.method.cfg_dropout)
    if name == "dmd":
        from distill.schedule import make_schedule
        from losses.dmd import DMDMethod

        schedule = make_schedule(job.schedule.kind, shift=job.schedule.shift)
        times = schedule.timesteps(job.method.student_steps)[:-1].tolist()
        return DMDMethod(times=times, guidance=job.method.guidance, t_min=job.method.t_min, t_max=job.method.t_max,
                         time_distribution=job.schedule.time_distribution,
                         weights=job.method.weights or {"dmd": 1.0})
    raise ValueError(f"unknown method {name!r}; known: ['dmd', 'flow', 'regression']")


def _causal_or_regression(job: JobConfig) -> Method:
    """ODE-pair regression (causal or bidirectional student) and DMD with a causal student."""
    from distill.schedule import make_schedule

    times = make_schedule(job.schedule.kind, shift=job.schedule.shift).timesteps(job.method.student_steps)[:-1].tolist()
    if job.method.name == "regression":
        from losses.regression import RegressionMethod

        return RegressionMethod(times=times, student=job.student, data=job.data)
    from losses.causal_dmd import CausalDMDMethod

    return CausalDMDMethod(times=times, guidance=job.method.guidance, t_min=job.method.t_min, t_max=job.method.t_max,
                           time_distribution=job.schedule.time_distribution,
                           weights=job.method.weights or {"dmd": 1.0}, student=job.student, data=job.data)


__all__ = ["Method", "build"]
