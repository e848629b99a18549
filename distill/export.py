"""Export a trained model directory (``distill train``'s ``<output>/model``) for other tools.

``diffusers``: a pipeline-style directory: ``transformer/`` (config + safetensors, loadable with
``WanTransformer3DModel.from_pretrained(dir, subfolder="transformer")``), ``scheduler/`` (a
``FlowMatchEulerDiscreteScheduler`` config; a few-step student samples stochastically, re-noising its
``x0`` prediction at each step, which that scheduler's ``stochastic_sampling`` does), and a model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distill.schedule import schedule_from_dict

FORMATS = ("diffusers",)


def _unshifted(times: list[float], shift: float) -> list[float]:
    """Invert the flow shift: the sigmas to give ``scheduler.set_timesteps(sigmas=...)``, which shifts them."""
    return [round(t / (shift - (shift - 1) * t), 6) for t in times]


def export_diffusers(model_dir: str | Path, out_dir: str | Path) -> Path:
    model_dir, out = Path(model_dir), Path(out_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not (model_dir / "config.json").is_file() or not weights:
        raise FileNotFoundError(f"{model_dir} is not a trained model directory (config.json + *.safetensors)")
    schedule = schedule_from_dict(json.loads((model_dir / "schedule.json").read_text()))
    method = json.loads((model_dir / "method.json").read_text()) if (model_dir / "method.json").is_file() else {}
    if type(schedule).__name__ != "FlowMatching":
        raise ValueError(f"{model_dir}: only flow-matching models export to diffusers' FlowMatchEuler scheduler")
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    for path in [model_dir / "config.json", model_dir / "schedule.json", *weights]:
        shutil.copy2(path, out / "transformer" / path.name)
    times = method.get("timesteps")
    stochastic = times is not None and method.get("sampler") != "ode"  # phased consistency students step the ODE
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": schedule.num_train_timesteps,
                 "shift": schedule.shift, "stochastic_sampling": stochastic}
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
    (out / "method.json").write_text(json.dumps(method, indent=1))
    (out / "README.md").write_text(_model_card(method, schedule.shift, times))
    return out


def _model_card(method: dict, shift: float, times: list[float] | None) -> str:
    name = method.get("method", "flow")
    if times is None:
        sampling = "Sample it like its teacher: Euler steps with classifier-free guidance (50 steps is the reference)."
    else:
        sigmas = _unshifted(times, shift)
        sampling = (f"A {len(times)}-step student distilled with `{name}` (guidance {method.get('guidance')} baked in: "
                    f"sample without CFG). Its step list is t = {times} (after the flow shift {shift}); with the "
                    f"scheduler here call `scheduler.set_timesteps(sigmas={sigmas})`, which applies the shift, and "
                    + ("each step is a deterministic Euler step to the next time (a phased consistency student)."
                       if method.get("sampler") == "ode" else
                       "each step predicts x0 and re-noises it to the next time (`stochastic_sampling`)."))
    return f"""# Exported by fewstep-distill

- training method: `{name}`
- layout: `transformer/` (diffusers `WanTransformer3DModel`: `from_pretrained(dir, subfolder="transformer")`),
  `scheduler/` (`FlowMatchEulerDiscreteScheduler`), `method.json` (how it was trained)
- {sampling}

Made with `distill train` (DeepSpeed) and `distill export --format diffusers`; see the project's README and
the job file recorded beside the training run (`job.json`).
"""
