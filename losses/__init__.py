"""Distillation objectives. ``build`` turns a job's method table into a Method."""

from __future__ import annotations

from distill.config import JobConfig
from losses.base import Method


def build(job: JobConfig) -> Method:
    """The Method named by ``job.method.name``."""
    name = job.method.name
    if name == "flow":
        from losses.flow_matching import FlowMatchingMethod

        return FlowMatchingMethod(time_distribution=job.schedule.time_distribution,
                                  cfg_dropout=job.method.cfg_dropout)
    raise ValueError(f"unknown method {name!r}; known: ['flow']")


__all__ = ["Method", "build"]
