"""Noise schedules in continuous time, and the one place that converts between predictions.

Every schedule writes a noisy sample as ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``t`` in
``[0, 1]`` (``t = 1`` is pure noise). A model's native output is a fixed linear combination
``pred = a * x0 + b * eps`` (see :func:`prediction_coefficients`), so recovering ``(x0, eps)`` from
``(x_t, pred)`` is one 2x2 linear solve, shared by every schedule and every loss.

``t`` may be a float, a ``[B]`` tensor, or a per-frame ``[B, T]`` tensor (causal students,
diffusion forcing); it is broadcast against latents ``[B, C, T, H, W]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

PREDICTIONS = ("x0", "eps", "velocity", "v")
TimeLike = float | Tensor


def broadcast_time(t: TimeLike, x: Tensor) -> Tensor:
    """Shape ``t`` (scalar, ``[B]`` or ``[B, T]``) so that it broadcasts against ``x`` ``[B, C, T, H, W]``."""
    t = torch.as_tensor(t, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    if t.ndim == 0:
        return t
    if x.ndim != 5:
        raise ValueError(f"latents must be [B, C, T, H, W], got shape {tuple(x.shape)}")
    if t.ndim == 1 and t.shape[0] == x.shape[0]:
        return t.view(-1, 1, 1, 1, 1)
    if t.ndim == 2 and t.shape == (x.shape[0], x.shape[2]):
        return t.view(t.shape[0], 1, t.shape[1], 1, 1)
    raise ValueError(f"time of shape {tuple(t.shape)} does not fit latents {tuple(x.shape)}: expected [B] or [B, T]")


def device_times(times: Sequence[float], device: torch.device | str) -> list[Tensor]:
    """A step list as 0-d float32 tensors on ``device``, made once per sampling call by fill kernels: a Python float
    turned into a device tensor at every step (as :func:`broadcast_time` does with a float) is a blocking
    host-to-device copy, which stops the host from queueing work ahead of the GPU."""
    return [torch.full((), t, dtype=torch.float32, device=device) for t in times]


def prediction_coefficients(prediction: str, alpha: Tensor, sigma: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """``(a, b)`` with ``pred = a * x0 + b * eps`` for each prediction type.

    ``velocity`` is the flow-matching target ``eps - x0`` (rectified flow; Liu et al. 2022),
    ``v`` is the VP v-prediction ``alpha * eps - sigma * x0`` (Salimans & Ho 2022).
    """
    if prediction == "x0":
        return 1.0, 0.0
    if prediction == "eps":
        return 0.0, 1.0
    if prediction == "velocity":
        return -1.0, 1.0
    if prediction == "v":
        return -sigma, alpha
    raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")


def shift_time(t: TimeLike, shift: float) -> TimeLike:
    """Resolution shift of flow time (Esser et al. 2024; Wan's ``flow_shift``): more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class Schedule:
    """Shared math of all schedules; subclasses define ``alpha_sigma`` and the native prediction."""

    prediction: str = "velocity"
    shift: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}; expected one of {PREDICTIONS}")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift must be a positive finite number, got {self.shift}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _coefficients(self, t: TimeLike, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha_sigma(broadcast_time(t, x))

    def add_noise(self, x0: Tensor, eps: Tensor, t: TimeLike) -> Tensor:
        """``x_t`` from clean latents and noise."""
        alpha, sigma = self._coefficients(t, x0)
        return alpha * x0 + sigma * eps

    def renoise(self, x_s: Tensor, s: TimeLike, t: TimeLike, eps: Tensor) -> Tensor:
        """A sample of ``x_t`` given ``x_s`` at a lower noise level ``s <= t`` (the forward process from ``s``):
        ``x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2) eps``. From ``s = 0`` it is
        :meth:`add_noise`; discriminators use it to noise samples that are themselves at a level ``s > 0``."""
        alpha_s, sigma_s = self._coefficients(s, x_s)
        alpha_t, sigma_t = self._coefficients(t, x_s)
        ratio = alpha_t / alpha_s
        return ratio * x_s + (sigma_t**2 - (ratio * sigma_s) ** 2).clamp_min(0).sqrt() * eps

    def target(self, x0: Tensor, eps: Tensor, t: TimeLike) -> Tensor:
        """The native prediction a perfect model outputs: the training target."""
        alpha, sigma = self._coefficients(t, x0)
        a, b = prediction_coefficients(self.prediction, alpha, sigma)
        return a * x0 + b * eps

    def split(self, x_t: Tensor, t: TimeLike, pred: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0, eps)`` from a noisy sample and the model's native prediction (a 2x2 solve)."""
        alpha, sigma = self._coefficients(t, x_t)
        a, b = prediction_coefficients(self.prediction, alpha, sigma)
        det = alpha * b - sigma * a
        if not torch.is_tensor(det):
            det = torch.as_tensor(det, dtype=x_t.dtype, device=x_t.device)
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        x0 = (b * x_t - sigma * pred) / det
        eps = (alpha * pred - a * x_t) / det
        return x0, eps

    def step(self, x_t: Tensor, t: TimeLike, s: TimeLike, pred: Tensor) -> Tensor:
        """Deterministic ODE step ``x_t -> x_s`` (DDIM; for flow matching exactly an Euler step)."""
        x0, eps = self.split(x_t, t, pred)
        return self.add_noise(x0, eps, s)

    def timesteps(self, steps: int) -> Tensor:
        """``steps + 1`` times from 1 to 0, evenly spaced on the teacher's scale, then shifted.

        The first ``steps`` entries are a few-step student's step list: 4 steps are
        1000/750/500/250 on a 1000-step scale before the shift.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), self.shift).float()

    def model_time(self, t: Tensor) -> Tensor:
        """Time as the wrapped network expects it (``t * num_train_timesteps``)."""
        return t * self.num_train_timesteps

    def sample_training_time(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                             device: torch.device | str = "cpu", distribution: str = "logit_normal") -> Tensor:
        """Training noise levels: ``uniform`` or ``logit_normal`` (SD3, Esser et al. 2024), then shifted."""
        if distribution == "uniform":
            u = torch.rand(shape, generator=generator, device=device)
        elif distribution == "logit_normal":
            u = torch.sigmoid(torch.randn(shape, generator=generator, device=device))
        else:
            raise ValueError(f"unknown time distribution {distribution!r}; expected 'uniform' or 'logit_normal'")
        return shift_time(u, self.shift)


@dataclass(frozen=True)
class FlowMatching(Schedule):
    """Rectified flow as in Wan, HunyuanVideo and LTX-Video: ``x_t = (1 - t) x0 + t eps``, velocity target."""

    prediction: str = "velocity"

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t


@dataclass(frozen=True)
class VPSchedule(Schedule):
    """Discrete DDPM schedule made continuous, as CogVideoX trains it (Yang et al. 2024).

    Scaled-linear betas, an SNR shift (``alpha_bar / (s + (1 - s) alpha_bar)``), and optionally
    zero terminal SNR (Lin et al. 2024) so that ``t = 1`` is pure noise. ``alpha_bar`` is linearly
    interpolated in log space between the ``num_train_timesteps`` discrete levels.
    """

    prediction: str = "v"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift: float = 3.0
    zero_terminal_snr: bool = True

    def alphas_cumprod(self) -> Tensor:
        n = self.num_train_timesteps
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2
        alpha_bar = torch.cumprod(1 - betas, 0)
        alpha_bar = alpha_bar / (self.snr_shift + (1 - self.snr_shift) * alpha_bar)
        if self.zero_terminal_snr:
            root = alpha_bar.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            alpha_bar = ((root - last) * first / (first - last)) ** 2
        return alpha_bar

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        table = self.alphas_cumprod().to(device=t.device)
        pos = t.double().clamp(0, 1) * (self.num_train_timesteps - 1)
        lo = pos.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = pos - lo
        log_table = table.clamp_min(1e-30).log()
        alpha_bar = torch.exp((1 - w) * log_table[lo] + w * log_table[lo + 1])
        alpha_bar = torch.where(pos >= self.num_train_timesteps - 1, table[-1].expand_as(alpha_bar), alpha_bar)
        return alpha_bar.sqrt().to(t.dtype), (1 - alpha_bar).sqrt().to(t.dtype)

    def model_time(self, t: Tensor) -> Tensor:
        return t * (self.num_train_timesteps - 1)


SCHEDULES: dict[str, type[Schedule]] = {"flow": FlowMatching, "vp": VPSchedule}


def make_schedule(kind: str = "flow", **kwargs) -> Schedule:
    """Build a schedule by name (``flow`` or ``vp``) from keyword settings (e.g. a job file's table)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[kind](**kwargs)


def schedule_to_dict(schedule: Schedule) -> dict:
    """A JSON-able description that :func:`schedule_from_dict` turns back into the same schedule."""
    kind = next(name for name, cls in SCHEDULES.items() if type(schedule) is cls)
    return {"kind": kind, **dataclasses.asdict(schedule)}


def schedule_from_dict(table: dict) -> Schedule:
    table = dict(table)
    return make_schedule(table.pop("kind", "flow"), **table)


def euler_sample(model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, schedule: Schedule, steps: int,
                 progress: bool = False) -> Tensor:
    """Deterministic sampler: ``steps`` ODE steps from pure noise to ``x0``.

    ``model(x_t, t)`` returns the native prediction with guidance already applied (a Denoiser's
    ``guided``), and ``t`` is a ``[B]`` tensor.
    """
    from tqdm.auto import tqdm

    times = schedule.timesteps(steps).to(noise.device)
    x = noise
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t = times[i].expand(noise.shape[0]).to(noise.dtype)
        x0, eps = schedule.split(x, t, model(x, t))
        # The last step returns x0 itself: a VP schedule's t = 0 still carries a little noise.
        x = x0 if i == steps - 1 else schedule.add_noise(x0, eps, times[i + 1])
    return x
