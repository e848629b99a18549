"""Export a trained model directory (``distill train``'s ``<output>/model``) for other tools.

``diffusers``: a pipeline-style directory: ``transformer/`` (config + safetensors, loadable with
``WanTransformer3DModel.from_pretrained(dir, subfolder="transformer")``), ``scheduler/`` (a
``FlowMatchEulerDiscreteScheduler`` config; a few-step student samples stochastically, re-noising its
``x0`` prediction at each step, which that scheduler's ``stochastic_sampling`` does), and a model card. A
LoRA run's student is fused into its base first.

``lora``: a LoRA run's adapter file in diffusers' format, which the teacher's pipeline loads with
``load_lora_weights``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from distill.attention.spec import SAVED_NAME
from distill.lora import LORA_FILE, LORA_META, is_lora_model, load_student
from distill.schedule import schedule_from_dict
from teachers.wan import COORDINATE_CHANNELS, INPUTS_FILE, saved_inputs


def _unshifted(times: list[float], shift: float) -> list[float]:
    """Invert the flow shift: the sigmas to give ``scheduler.set_timesteps(sigmas=...)``, which shifts them."""
    return [round(t / (shift - (shift - 1) * t), 6) for t in times]


def export_diffusers(model_dir: str | Path, out_dir: str | Path) -> Path:
    model_dir, out = Path(model_dir), Path(out_dir)
    if is_lora_model(model_dir):  # fused: the LoRA merged into the base it was trained on
        with tempfile.TemporaryDirectory() as fused:
            load_student(model_dir).save_pretrained(fused)
            shutil.copy2(model_dir / "method.json", Path(fused) / "method.json")
            return export_diffusers(fused, out)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not (model_dir / "config.json").is_file() or not weights:
        raise FileNotFoundError(f"{model_dir} is not a trained model directory (config.json + *.safetensors)")
    schedule = schedule_from_dict(json.loads((model_dir / "schedule.json").read_text()))
    method = json.loads((model_dir / "method.json").read_text()) if (model_dir / "method.json").is_file() else {}
    if type(schedule).__name__ != "FlowMatching":
        raise ValueError(f"{model_dir}: only flow-matching models export to diffusers' FlowMatchEuler scheduler")
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    extra_inputs = saved_inputs(model_dir)
    inputs = [model_dir / INPUTS_FILE] if any(extra_inputs.values()) else []
    for path in [model_dir / "config.json", model_dir / "schedule.json", *inputs, *weights]:
        shutil.copy2(path, out / "transformer" / path.name)
    times = method.get("timesteps")
    stochastic = times is not None and method.get("sampler") != "ode"  # phased consistency students step the ODE
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": schedule.num_train_timesteps,
                 "shift": schedule.shift, "stochastic_sampling": stochastic}
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=1))
    (out / "method.json").write_text(json.dumps(method, indent=1))
    if (model_dir / SAVED_NAME).is_file():  # a sparse student keeps the attention it was trained with
        shutil.copy2(model_dir / SAVED_NAME, out / SAVED_NAME)
    (out / "README.md").write_text(_model_card(method, schedule.shift, times, **extra_inputs))
    return out


def export_lora(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A LoRA run's student as a directory that ``WanPipeline.load_lora_weights(dir)`` reads (unfused; the
    pipeline's ``fuse_lora()`` fuses it), with its settings, schedule and a model card."""
    model_dir, out = Path(model_dir), Path(out_dir)
    if not is_lora_model(model_dir):
        raise ValueError(f"{model_dir} is not a LoRA run's model directory ({LORA_FILE} + {LORA_META}); "
                         "full-weight students export with --format diffusers")
    out.mkdir(parents=True, exist_ok=True)
    for name in (LORA_FILE, LORA_META, "schedule.json", "method.json"):
        shutil.copy2(model_dir / name, out / name)
    method = json.loads((model_dir / "method.json").read_text())
    schedule = schedule_from_dict(json.loads((model_dir / "schedule.json").read_text()))
    base = json.loads((model_dir / LORA_META).read_text())["base"]
    (out / "README.md").write_text(_model_card(method, schedule.shift, method.get("timesteps"), lora_of=base))
    return out


def _model_card(method: dict, shift: float, times: list[float] | None, lora_of: dict | None = None,
                coordinate_frames: int = 0, offset_frames: int = 0) -> str:
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
    layout = ("""`transformer/` (diffusers `WanTransformer3DModel`: `from_pretrained(dir, subfolder="transformer")`),
  `scheduler/` (`FlowMatchEulerDiscreteScheduler`), `method.json` (how it was trained)""" if lora_of is None else
              f"""`{LORA_FILE}` (a LoRA of the teacher `{lora_of.get('source') or lora_of.get('family')}`:
  `pipe.load_lora_weights(dir)` on its `WanPipeline`, then optionally `pipe.fuse_lora()`), `{LORA_META}`
  (rank, target modules, base), `method.json` (how it was trained)""")
    inputs = "" if not coordinate_frames else f"""
- inputs: the transformer takes {COORDINATE_CHANNELS} coordinate channels after the latent channels, which the
  caller must concatenate (`teachers.wan.coordinate_channels` makes them): x across the width, y across the
  height, and the frame, each in [-1, 1], the frame `i` at `i / ({coordinate_frames} - 1) * 2 - 1` capped at 1
  (scaled to the {coordinate_frames}-frame training clip; `transformer/{INPUTS_FILE}`). A stock `WanPipeline`
  does not add them."""
    if offset_frames:
        inputs += f"""
- inputs: one more channel last, constant over the clip: where the clip starts in its long video, in
  frames / {offset_frames} (`teachers.wan.offset_channel`; 0 for a video's opening). A stock `WanPipeline` does
  not add it."""
    return f"""# Exported by fewstep-distill

- training method: `{name}`
- layout: {layout}
- {sampling}{inputs}

Made with `distill train` (DeepSpeed) and `distill export --format diffusers`; see the project's README and
the job file recorded beside the training run (`job.json`).
"""
