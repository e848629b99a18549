"""Wan2.1/2.2 teachers through diffusers' ``WanTransformer3DModel`` (Wan team, 2025)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
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


INPUTS_FILE = "inputs.json"  # {"coordinate_frames": N, "offset_frames": M} beside a saved model with extra inputs
COORDINATE_CHANNELS = 3  # x, y, frame


def saved_inputs(directory: str | Path) -> dict[str, int]:
    """The extra inputs recorded beside a saved transformer (its ``inputs.json``): ``coordinate_frames`` and
    ``offset_frames``, 0 where it has none."""
    file = Path(directory) / INPUTS_FILE
    saved = json.loads(file.read_text()) if file.is_file() else {}
    return {key: int(saved.get(key, 0)) for key in ("coordinate_frames", "offset_frames")}


def coordinate_channels(batch: int, frames: int, height: int, width: int, reference_frames: int,
                        frame_offset: int = 0, device=None, dtype: torch.dtype | None = None) -> Tensor:
    """Absolute (x, y, frame) coordinates in [-1, 1] as three input channels ``[B, 3, T, H, W]``.

    Wan's only position signal is rotary (relative), so from pure noise it cannot say where or when a shape is,
    and so cannot learn what a position-dependent word (a motion direction) implies (teachers/tiny/README.md,
    eval/position_check.py). x runs across the width, y across the height; frame ``frame_offset + i`` sits at
    ``(frame_offset + i) / (reference_frames - 1) * 2 - 1``, so a clip of the training length ``reference_frames``
    spans [-1, 1], and frames past it (a long stream) saturate at 1, the last value training saw."""
    if reference_frames < 2:
        raise ValueError(f"coordinate channels need reference_frames >= 2, got {reference_frames}")
    x = torch.linspace(-1, 1, width, device=device)
    y = torch.linspace(-1, 1, height, device=device)
    f = (torch.arange(frames, device=device) + frame_offset) / (reference_frames - 1) * 2 - 1
    shape = (frames, height, width)
    grid = torch.stack([x.view(1, 1, -1).expand(shape), y.view(1, -1, 1).expand(shape),
                        f.clamp(max=1).view(-1, 1, 1).expand(shape)])
    return grid.to(dtype or torch.get_default_dtype()).unsqueeze(0).expand(batch, -1, -1, -1, -1)


def offset_channel(frame_offset: Tensor | None, like: Tensor, offset_frames: int) -> Tensor:
    """Where each clip of ``like`` (``[B, C, T, H, W]``) starts in its long video, as one constant input channel
    ``frame_offset / offset_frames`` (``[B, 1, T, H, W]``; None: every clip at its video's start, 0). With it a
    teacher trained on windows of long videos knows which window it makes: in the tiny domain the prompt states the
    initial heading, which a later window no longer shows once the shape has bounced."""
    B, _, T, H, W = like.shape
    if frame_offset is None:
        return like.new_zeros(B, 1, T, H, W)
    value = frame_offset.to(like.device, like.dtype) / offset_frames
    return value.view(B, 1, 1, 1, 1).expand(B, 1, T, H, W)


def _extra_channels(coordinate_frames: int, offset_frames: int) -> int:
    """Input channels after the latents: the coordinates' three and the offset's one, where the model has them."""
    return (COORDINATE_CHANNELS if coordinate_frames else 0) + (1 if offset_frames else 0)


class _FeaturesReady(Exception):
    """Raised by the hook of :meth:`WanDenoiser.features` to end the forward early."""


class WanDenoiser(Denoiser):
    """Wraps a diffusers ``WanTransformer3DModel``: flow matching, velocity prediction, time on a 0-1000 scale.

    Per-frame times ``[B, T]`` become per-token times, which diffusers Wan accepts (Wan2.2 TI2V path).

    ``coordinate_frames = N > 0``: the transformer's ``in_channels`` are the latent channels followed by three
    :func:`coordinate_channels` (frame scaled to ``N``, the training clip length), which :meth:`forward` appends;
    callers pass latents only. 0: none (a stock Wan transformer). ``offset_frames = M > 0``: one more channel after
    them, :func:`offset_channel` (the clip's ``cond.frame_offset`` scaled to ``M``).
    """

    def __init__(self, transformer: WanTransformer3DModel, schedule: Schedule | None = None,
                 coordinate_frames: int = 0, offset_frames: int = 0):
        super().__init__(schedule or FlowMatching())
        if coordinate_frames < 0 or coordinate_frames == 1:
            raise ValueError(f"coordinate_frames must be 0 (none) or the training clip length >= 2, "
                             f"got {coordinate_frames}")
        if offset_frames < 0:
            raise ValueError(f"offset_frames must be 0 (none) or > 0, got {offset_frames}")
        extra = _extra_channels(coordinate_frames, offset_frames)
        if transformer.config.in_channels <= extra:
            raise ValueError(f"coordinate_frames = {coordinate_frames} and offset_frames = {offset_frames} need "
                             f"in_channels = latent channels + {extra} input channels (>= {extra + 1}), this "
                             f"transformer has in_channels = {transformer.config.in_channels}")
        self.transformer = transformer
        self.coordinate_frames, self.offset_frames = coordinate_frames, offset_frames

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels - _extra_channels(self.coordinate_frames, self.offset_frames)

    @property
    def config(self):
        return self.transformer.config

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

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, frame_offset: int = 0, **kwargs) -> Tensor:
        """``frame_offset``: the position of ``x_t``'s first frame for the frame coordinate (a streamed chunk's
        place in its window); only models with coordinate channels read it."""
        p_t, p_h, p_w = self.config.patch_size
        frames, height, width = x_t.shape[2:]
        if x_t.shape[1] != self.latent_channels or frames % p_t or height % p_h or width % p_w:
            raise ValueError(f"latents {tuple(x_t.shape)} do not fit this Wan model: {self.latent_channels} channels, "
                             f"T/H/W divisible by patch size {tuple(self.config.patch_size)}")
        dtype = self.transformer.patch_embedding.weight.dtype  # what the first layer takes; diffusers' `dtype` walks
        # every module on each call (about 1 ms of Python per forward)
        inputs = [x_t]
        if self.coordinate_frames:
            inputs.append(coordinate_channels(x_t.shape[0], frames, height, width, self.coordinate_frames,
                                              frame_offset, x_t.device, x_t.dtype))
        if self.offset_frames:
            inputs.append(offset_channel(cond.frame_offset, x_t, self.offset_frames))
        hidden = torch.cat(inputs, dim=1) if len(inputs) > 1 else x_t
        out = self.transformer(
            hidden_states=hidden.to(dtype),
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

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every transformer block in place (state dict names unchanged): fusing the norms,
        modulations and gates around the matrix products halves the kernels of a forward and its GPU time (the
        tiny causal training step on an H200; its host time, which bounds that step, stays: Dynamo's guards take
        what the launches gave back). Static shapes: a causal student in cache mode shows a block one chunk whatever
        its window holds (the window-dependent attention runs eagerly), so all blocks and chunks share one set of
        graphs."""
        for block in self.transformer.blocks:
            block.compile(**{"dynamic": False, **options})

    def with_coordinates(self, frames: int) -> "WanDenoiser":
        """A copy of this model with coordinate input channels (frame scaled to ``frames``) whose patch-embedding
        weights are zero, so that it computes exactly what this model computes until training moves them: how a
        teacher trained without coordinates is fine-tuned with them. This model is left as it is."""
        if self.coordinate_frames:
            raise ValueError(f"this model has coordinate channels already (frame scaled to {self.coordinate_frames})")
        if self.offset_frames:
            raise ValueError("add coordinate channels before the offset channel (they come first in the inputs)")
        return WanDenoiser(self._widened(COORDINATE_CHANNELS), self.schedule, coordinate_frames=frames)

    def with_offsets(self, frames: int) -> "WanDenoiser":
        """A copy of this model with the clip-offset input channel (:func:`offset_channel`, scaled to ``frames``),
        zero-initialised like :meth:`with_coordinates`; at offset 0 the channel adds nothing, whatever training does
        to its weights. How the tiny teacher learns windows of long videos (``data.max_offset``)."""
        if self.offset_frames:
            raise ValueError(f"this model has an offset channel already (scaled to {self.offset_frames})")
        return WanDenoiser(self._widened(1), self.schedule, self.coordinate_frames, offset_frames=frames)

    def _widened(self, channels: int) -> WanTransformer3DModel:
        """A copy of the transformer taking ``channels`` more inputs, their patch-embedding weights zero."""
        transformer = copy.deepcopy(self.transformer)
        old = transformer.patch_embedding
        new = torch.nn.Conv3d(old.in_channels + channels, old.out_channels, old.kernel_size, old.stride,
                              bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()[:, :old.in_channels] = old.weight
            if old.bias is not None:
                new.bias.copy_(old.bias)
        transformer.patch_embedding = new.requires_grad_(old.weight.requires_grad)
        # out_channels explicitly: a config without it would otherwise follow in_channels
        transformer.register_to_config(in_channels=new.in_channels,
                                       out_channels=self.config.out_channels or self.config.in_channels)
        return transformer

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """A diffusers transformer directory (config + safetensors) plus ``schedule.json`` and, for a model with
        coordinate channels, ``inputs.json`` (a stock diffusers config cannot say what its extra channels are)."""
        path = Path(path)
        self.transformer.save_pretrained(path, safe_serialization=True)
        if dtype is not None:  # diffusers saves in the module's dtype; rewrite the weights in the one asked for
            from safetensors.torch import save_file

            state = {k: v.detach().to(dtype).contiguous() for k, v in self.transformer.state_dict().items()}
            for old in path.glob("*.safetensors*"):
                old.unlink()
            save_file(state, str(path / "diffusion_pytorch_model.safetensors"))
        (path / "schedule.json").write_text(json.dumps(schedule_to_dict(self.schedule), indent=1))
        inputs = {k: v for k, v in (("coordinate_frames", self.coordinate_frames),
                                    ("offset_frames", self.offset_frames)) if v}
        if inputs:
            (path / INPUTS_FILE).write_text(json.dumps(inputs, indent=1))
        else:
            (path / INPUTS_FILE).unlink(missing_ok=True)  # a stale one from an earlier save into this directory
        return path

    @classmethod
    def from_config(cls, config: dict[str, Any], schedule: Schedule | None = None,
                    dtype: torch.dtype = torch.float32, seed: int | None = 0,
                    coordinate_frames: int = 0) -> "WanDenoiser":
        """Random weights from a transformer config (benchmarks, tests, training from scratch); its
        ``in_channels`` include the coordinate channels when ``coordinate_frames`` > 0."""
        if seed is not None:
            torch.manual_seed(seed)
        unknown = set(config) - set(WanTransformer3DModel._get_init_keys(WanTransformer3DModel)) - {"_class_name",
                                                                                                     "_diffusers_version"}
        if unknown:
            raise ValueError(f"unknown WanTransformer3DModel config keys: {sorted(unknown)}")
        return cls(_cast(WanTransformer3DModel.from_config(config), dtype), schedule, coordinate_frames)

    @classmethod
    def from_pretrained(cls, path: str | Path, schedule: Schedule | None = None,
                        dtype: torch.dtype = torch.float32) -> "WanDenoiser":
        """Weights from a local diffusers directory: a transformer folder or a whole Wan pipeline folder (with
        ``inputs.json`` beside the transformer's config when it has coordinate channels)."""
        path = Path(path)
        if (path / "transformer").is_dir():
            schedule = schedule or _pipeline_schedule(path)
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers model directory (no config.json)")
        if schedule is None and (path / "schedule.json").is_file():
            schedule = schedule_from_dict(json.loads((path / "schedule.json").read_text()))
        transformer = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return cls(transformer, schedule, **saved_inputs(path))

    @classmethod
    def load(cls, source: str | Path | dict[str, Any], schedule: Schedule | None = None,
             dtype: torch.dtype = torch.float32) -> "WanDenoiser":
        """From a preset name, a config dict, a config ``.json`` file, or a local pretrained directory (only the
        last can have coordinate channels: its ``inputs.json`` says so)."""
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
