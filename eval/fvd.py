"""Frechet Video Distance (FVD): protocols, preprocessing and a torchmetrics metric.

An FVD number means little without its protocol (clip count, clip length, how real clips are
sampled, how frames are resized, which I3D), so every result records the protocol's name.

* ``FVDProtocol`` / ``PROTOCOLS`` / ``get_protocol(name)``: the common protocols, e.g.
  ``fvd2048_16f`` (StyleGAN-V: 2048 real and 2048 fake clips of 16 consecutive frames, real clips
  at random offsets, frames squash-resized to 224x224).
* ``preprocess(videos, protocol)``: uint8 ``[B, T, H, W, 3]`` or float ``[B, 3, T, H, W]`` in the
  protocol's ``value_range`` -> float32 ``[B, 3, T, 224, 224]`` in ``[-1, 1]``.
* ``random_clips(video, num_frames, generator)``: a clip of consecutive frames at a random offset.
* ``FVD(extractor, protocol)``: a ``torchmetrics.Metric``; ``update(videos, real=...)`` extracts
  features in batches into list states reduced with ``cat`` (so it works under DDP);
  ``compute()`` returns ``{"fvd", "protocol", "num_real", "num_fake"}``.

The extractor is any ``videos [B, 3, T, 224, 224] in [-1, 1] -> [B, D]`` callable, normally one of
``eval.i3d.load_i3d_torchscript`` (StyleGAN-V) or ``eval.i3d.load_i3d_state_dict`` (VideoGPT/TATS).
The distance itself is ``eval.frechet`` (float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from eval.frechet import frechet_from_features

__all__ = ["FVDProtocol", "PROTOCOLS", "get_protocol", "preprocess", "random_clips", "FVD"]

RESIZE_MODES = ("squash", "center_crop")


@dataclass(frozen=True)
class FVDProtocol:
    """How an FVD number is computed.

    ``resize``: ``"squash"`` resizes every frame to ``size x size`` ignoring aspect ratio
    (StyleGAN-V); ``"center_crop"`` resizes the shorter side to ``size`` and centre-crops
    (VideoGPT/TATS). Resizing is bilinear, ``align_corners=False``.
    ``value_range``: the range of *float* inputs to ``preprocess`` (uint8 is always 0..255).
    ``extractor``: which I3D the protocol's published numbers use.
    """

    name: str
    num_frames: int = 16
    num_clips: int = 2048
    resize: str = "squash"
    value_range: tuple[float, float] = (-1.0, 1.0)
    size: int = 224
    real_clip_sampling: str = "random_offset"
    extractor: str = "i3d_torchscript"
    description: str = ""

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.num_frames < 1 or self.num_clips < 2 or self.size < 1:
            raise ValueError(
                f"need num_frames >= 1, num_clips >= 2, size >= 1; got {self.num_frames}, {self.num_clips}, {self.size}"
            )
        lo, hi = self.value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {self.value_range}")


PROTOCOLS: dict[str, FVDProtocol] = {
    p.name: p
    for p in (
        FVDProtocol(
            "fvd2048_16f",
            num_frames=16,
            num_clips=2048,
            resize="squash",
            description="StyleGAN-V: 2048 real / 2048 fake clips of 16 consecutive frames, real clips at "
            "random offsets, squash-resized to 224x224, StyleGAN-V's TorchScript I3D.",
        ),
        FVDProtocol(
            "fvd2048_128f",
            num_frames=128,
            num_clips=2048,
            resize="squash",
            description="StyleGAN-V long-video variant: as fvd2048_16f with 128-frame clips.",
        ),
        FVDProtocol(
            "videogpt_fvd2048_16f",
            num_frames=16,
            num_clips=2048,
            resize="center_crop",
            extractor="i3d_state_dict",
            description="VideoGPT/TATS: 16-frame clips, shorter side resized to 224 then centre crop, "
            "pytorch-i3d i3d_pretrained_400.pt, time-averaged 400-d logits.",
        ),
    )
}


def get_protocol(name: str | FVDProtocol) -> FVDProtocol:
    """The protocol called ``name`` (a protocol passes through)."""
    if isinstance(name, FVDProtocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown FVD protocol {name!r}; known: {sorted(PROTOCOLS)}") from None


def _to_unit_range(videos: torch.Tensor, protocol: FVDProtocol) -> torch.Tensor:
    """uint8 [B,T,H,W,3] or float [B,3,T,H,W] -> float32 [B,3,T,H,W] in [-1, 1]."""
    if videos.ndim != 5:
        raise ValueError(f"videos must be 5-D ([B,T,H,W,3] uint8 or [B,3,T,H,W] float), got {tuple(videos.shape)}")
    if videos.dtype == torch.uint8:
        if videos.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be [B, T, H, W, 3], got shape {tuple(videos.shape)}")
        x = videos.permute(0, 4, 1, 2, 3).to(torch.float32)
        return x / 127.5 - 1.0
    if not videos.is_floating_point():
        raise ValueError(f"videos must be uint8 or floating point, got {videos.dtype}")
    if videos.shape[1] != 3:
        raise ValueError(f"float videos must be [B, 3, T, H, W], got shape {tuple(videos.shape)}")
    lo, hi = protocol.value_range
    x = videos.to(torch.float32)
    x = (x - lo) / (hi - lo) * 2.0 - 1.0
    return x.clamp(-1.0, 1.0)


def preprocess(videos: torch.Tensor, protocol: FVDProtocol | str) -> torch.Tensor:
    """Videos -> float32 ``[B, 3, T, size, size]`` in ``[-1, 1]`` following ``protocol.resize``."""
    protocol = get_protocol(protocol)
    x = _to_unit_range(videos, protocol)
    b, c, t, h, w = x.shape
    size = protocol.size
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if protocol.resize == "squash":
        if (h, w) != (size, size):
            frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
    else:  # center_crop
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        frames = frames[:, :, top : top + size, left : left + size]
    out = frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)
    return out.clamp(-1.0, 1.0).contiguous()


def random_clips(
    video: torch.Tensor,
    num_frames: int,
    generator: torch.Generator | None = None,
    time_dim: int = 0,
    num_clips: int | None = None,
) -> torch.Tensor:
    """``num_frames`` consecutive frames of ``video`` starting at a uniformly random offset.

    ``time_dim`` is the frame axis (0 for uint8 ``[T, H, W, 3]``, 1 for float ``[3, T, H, W]``).
    With ``num_clips`` set, draws that many clips (independent offsets) stacked on a new dim 0.
    """
    total = video.shape[time_dim]
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total < num_frames:
        raise ValueError(f"video has {total} frames (dim {time_dim}), fewer than the {num_frames} a clip needs")

    def one() -> torch.Tensor:
        offset = int(torch.randint(0, total - num_frames + 1, (1,), generator=generator).item())
        return video.narrow(time_dim, offset, num_frames)

    if num_clips is None:
        return one()
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    return torch.stack([one() for _ in range(num_clips)])


class FVD(Metric):
    """FVD between real and generated clips under a named protocol.

    ``update(videos, real=True/False)`` takes a batch in any form ``preprocess`` accepts, with
    exactly ``protocol.num_frames`` frames (cut longer real videos with ``random_clips``).
    ``compute()`` needs at least 2 clips per side always, and ``protocol.num_clips`` per side
    unless ``allow_fewer=True`` (fewer clips bias FVD upwards; such numbers are not comparable).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        extractor: Callable[[torch.Tensor], torch.Tensor],
        protocol: FVDProtocol | str = "fvd2048_16f",
        batch_size: int = 16,
        allow_fewer: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.extractor = extractor
        self.protocol = get_protocol(protocol)
        self.batch_size = batch_size
        self.allow_fewer = allow_fewer
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def _num_frames(self, videos: torch.Tensor) -> int:
        return videos.shape[1] if videos.dtype == torch.uint8 else videos.shape[2]

    def update(self, videos: torch.Tensor, real: bool) -> None:  # type: ignore[override]
        if videos.ndim != 5:
            raise ValueError(f"videos must be 5-D, got shape {tuple(videos.shape)}")
        t = self._num_frames(videos)
        if t != self.protocol.num_frames:
            raise ValueError(
                f"protocol {self.protocol.name!r} needs clips of {self.protocol.num_frames} frames, got {t}"
                + ("; cut longer videos with random_clips" if t > self.protocol.num_frames else "")
            )
        target = self.real_features if real else self.fake_features
        for start in range(0, videos.shape[0], self.batch_size):
            batch = preprocess(videos[start : start + self.batch_size], self.protocol)
            feats = torch.as_tensor(self.extractor(batch))
            if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
                raise ValueError(f"extractor must return [B, D] with B={batch.shape[0]}, got {tuple(feats.shape)}")
            target.append(feats.detach().to(self.device, torch.float32))

    @staticmethod
    def _cat(state) -> torch.Tensor:
        if isinstance(state, torch.Tensor):  # already concatenated by a distributed sync
            return state
        if len(state) == 0:
            return torch.zeros(0, 0)
        return dim_zero_cat(state)

    def compute(self) -> dict:
        real, fake = self._cat(self.real_features), self._cat(self.fake_features)
        n, m = real.shape[0], fake.shape[0]
        for side, count in (("real", n), ("fake", m)):
            problem = (f"FVD needs at least 2 {side} clips, got {count}" if count < 2 else
                       f"protocol {self.protocol.name!r} asks for {self.protocol.num_clips} {side} clips, got {count}; "
                       "pass allow_fewer=True to compute anyway (the result is biased and not comparable)"
                       if count < self.protocol.num_clips and not self.allow_fewer else None)
            if problem:
                if self._is_synced:  # torchmetrics does not restore the local state when compute raises
                    self.unsync()
                raise ValueError(problem)
        value = frechet_from_features(real, fake)
        return {"fvd": value, "protocol": self.protocol.name, "num_real": int(n), "num_fake": int(m)}
