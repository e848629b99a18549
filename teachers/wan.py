"""Wan2.1/2.2 teachers through diffusers' ``WanTransformer3DModel`` (Wan team, 2025)."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import Tensor

from distill.conditioning import Conditioning
from distill.schedule import FlowMatching, Schedule, schedule_from_dict, schedule_to_dict
from teachers.base import Denoiser

_WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                   rope_max_seq_len=1024)

# Named configs for benchmarks and tests with random weights. The Wan presets match the published
# transformer configs; "tiny-random" is a few-layer model over pixels (3 channels) with MiniLM text.
WAN_PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": dict(_WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": dict(_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "tiny-random": dict(_WAN_COMMON, num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                        text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2),
}

# Shift of each preset's sampling schedule (Wan2.1 samples 480p text-to-video with flow_shift 3-5).
_PRESET_SHIFT = {"wan2.1-t2v-1.3b": 3.0, "wan2.1-t2v-14b": 5.0, "tiny-random": 1.0}


class _FeaturesReady(Exception):
    """Raised by the hook of :meth:`WanDenoiser.features` to end the forward early."""


class WanDenoiser(Denoiser):
    """Wraps a diffusers ``WanTransformer3DModel``: flow matching, velocity prediction, time on a 0-1000 scale.

    Per-frame times ``[B, T]`` become per-token times, which diffusers Wan accepts (Wan2.2 TI2V path).
    """

    def __init__(self, transformer: WanTransformer3DModel, schedule: Schedule | None = None):
        super().__init__(schedule or FlowMatching())
        self.transformer = transformer

    @property
    def config(self):
        return self.transformer.config

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    def _timestep(self, t: Tensor, x_t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        model_t = self.schedule.model_time(t)
        if model_t.ndim == 1:
            return model_t
        p_t, p_h, p_w = self.config.patch_size
        frames, height, width = x_t.shape[2:]
        if model_t.shape != (x_t.shape[0], frames):
            raise ValueError(f"per-frame time must be [B, T] = {(x_t.shape[0], frames)}, got {tuple(model_t.shape)}")
        tokens_per_frame = (height // p_h) * (width // p_w)
        return model_t[:, ::p_t].repeat_interleave(tokens_per_frame, dim=1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, **kwargs) -> Tensor:
        p_t, p_h, p_w = self.config.patch_size
        frames, height, width = x_t.shape[2:]
        if x_t.shape[1] != self.latent_channels or frames % p_t or height % p_h or width % p_w:
            raise ValueError(f"latents {tuple(x_t.shape)} do not fit this Wan model: {self.latent_channels} channels, "
                             f"T/H/W divisible by patch size {tuple(self.config.patch_size)}")
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=self._timestep(t, x_t),
            encoder_hidden_states=cond.masked_text().to(dtype),
            encoder_hidden_states_image=None if cond.image is None else cond.image.to(dtype),
            return_dict=False,
            **kwargs,
        )[0]
        return out.to(x_t.dtype)

    @property
    def feature_dim(self) -> int:
        return self.config.num_attention_heads * self.config.attention_head_dim

    def features(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                 layer: int | Sequence[int] | None = None) -> Tensor | list[Tensor]:
        """Tokens ``[B, S, feature_dim]`` after block ``layer`` (default: the middle one), or a list of them for a
        list of blocks (``None`` in it: the middle one); the forward stops after the deepest one. Discriminator
        heads read them (DMD2's GAN branch on the fake-score network; LADD's heads on several teacher blocks)."""
        blocks = self.transformer.blocks
        single = not isinstance(layer, Sequence)
        layers = [len(blocks) // 2 if i is None else i for i in ([layer] if single else layer)]
        if any(not -len(blocks) <= i < len(blocks) for i in layers):
            raise ValueError(f"feature layers {layers} out of range: this model has {len(blocks)} blocks")
        layers = [i % len(blocks) for i in layers]
        captured: dict[int, Tensor] = {}

        def keep(index: int):
            def hook(module, args, output):
                captured[index] = output
                if index == max(layers):
                    raise _FeaturesReady
            return hook

        handles = [blocks[i].register_forward_hook(keep(i)) for i in set(layers)]
        try:
            self(x_t, t, cond)
        except _FeaturesReady:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured[layers[0]] if single else [captured[i] for i in layers]

    def enable_gradient_checkpointing(self) -> None:
        from distill.checkpointing import checkpoint_block

        self.transformer.enable_gradient_checkpointing(checkpoint_block)  # recompute with the forward's frozen params

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """A diffusers transformer directory (config + safetensors) plus ``schedule.json``."""
        path = Path(path)
        self.transformer.save_pretrained(path, safe_serialization=True)
        if dtype is not None:  # diffusers saves in the module's dtype; rewrite the weights in the one asked for
            from safetensors.torch import save_file

            state = {k: v.detach().to(dtype).contiguous() for k, v in self.transformer.state_dict().items()}
            for old in path.glob("*.safetensors*"):
                old.unlink()
            save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
        (path / "schedule.json").write_text(json.dumps(schedule_to_dict(self.schedule), indent=1))
        return path

    @classmethod
    def from_config(cls, config: dict[str, Any], schedule: Schedule | None = None,
                    dtype: torch.dtype = torch.float32, seed: int | None = 0) -> "WanDenoiser":
        """Random weights from a transformer config (benchmarks, tests, training from scratch)."""
        if seed is not None:
            torch.manual_seed(seed)
        unknown = set(config) - set(WanTransformer3DModel._get_init_keys(WanTransformer3DModel)) - {"_class_name",
                                                                                                     "_diffusers_version"}
        if unknown:
            raise ValueError(f"unknown WanTransformer3DModel config keys: {sorted(unknown)}")
        return cls(_cast(WanTransformer3DModel.from_config(config), dtype), schedule)

    @classmethod
    def from_pretrained(cls, path: str | Path, schedule: Schedule | None = None,
                        dtype: torch.dtype = torch.float32) -> "WanDenoiser":
        """Weights from a local diffusers directory: a transformer folder or a whole Wan pipeline folder."""
        path = Path(path)
        if (path / "transformer").is_dir():
            schedule = schedule or _pipeline_schedule(path)
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers model directory (no config.json)")
        if schedule is None and (path / "schedule.json").is_file():
            schedule = schedule_from_dict(json.loads((path / "schedule.json").read_text()))
        transformer = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return cls(transformer, schedule)

    @classmethod
    def load(cls, source: str | Path | dict[str, Any], schedule: Schedule | None = None,
             dtype: torch.dtype = torch.float32) -> "WanDenoiser":
        """From a preset name, a config dict, a config ``.json`` file, or a local pretrained directory."""
        if isinstance(source, dict):
            return cls.from_config(source, schedule, dtype)
        if isinstance(source, str) and source in WAN_PRESETS:
            return cls.from_config(WAN_PRESETS[source], schedule or FlowMatching(shift=_PRESET_SHIFT[source]), dtype)
        path = Path(source)
        if path.is_dir():
            return cls.from_pretrained(path, schedule, dtype)
        if path.suffix == ".json" and path.is_file():
            return cls.from_config(json.loads(path.read_text()), schedule, dtype)
        raise FileNotFoundError(f"Wan teacher source {str(source)!r} is neither a preset {sorted(WAN_PRESETS)}, "
                                "a config .json file, nor a local diffusers directory")


def _cast(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast to ``dtype`` but keep the modules diffusers wants in float32 (norms, time embedding, RoPE)."""
    torch.nn.Module.to(transformer, dtype)  # diffusers .to() warns; fp32 modules are restored below
    keep = set(transformer._keep_in_fp32_modules or ())
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if keep & set(name.split(".")):
            tensor.data = tensor.data.float()
    return transformer


def _pipeline_schedule(pipeline_dir: Path) -> Schedule:
    """The flow shift recorded in a Wan pipeline's scheduler config (1.0 when absent)."""
    if (pipeline_dir / "transformer" / "schedule.json").is_file():  # exported by this project
        return schedule_from_dict(json.loads((pipeline_dir / "transformer" / "schedule.json").read_text()))
    config_file = pipeline_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    shift = config.get("flow_shift") or config.get("shift") or 1.0  # UniPC/DPM name it flow_shift, FlowMatchEuler shift
    return FlowMatching(shift=float(shift))
