"""I3D feature extractors for FVD.

Two ways to get the I3D network that FVD numbers are reported with; neither downloads anything:

* ``load_i3d_state_dict(path)``: the PyTorch I3D of Carreira & Zisserman (2017) in the layout of
  the widely used ``pytorch-i3d`` implementation, loaded *strictly* from its published state dict
  ``i3d_pretrained_400.pt`` (the file VideoGPT, TATS, AnimateLCM and cd-fvd use). Features are the
  400 Kinetics logits averaged over time, which is what VideoGPT/TATS-style FVD uses.
* ``load_i3d_torchscript(path)``: StyleGAN-V's ``i3d_torchscript.pt`` (the TF-Hub I3D exported to
  TorchScript), called the way StyleGAN-V calls it (``rescale=False, resize=False,
  return_features=True``), which returns 400-d features.

Both are wrapped as a ``FeatureExtractor``: ``extractor(videos)`` with ``videos`` a float tensor
``[B, 3, T, H, W]`` in ``[-1, 1]`` (already resized to 224x224 by ``eval.fvd.preprocess``)
returns ``[B, D]`` float32 features on the CPU.

The state-dict names follow the public implementation exactly: ``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_5c.b3b.bn.running_mean``, ... and the final classifier is the attribute ``logits``
(``logits.conv3d.weight`` / ``logits.conv3d.bias``) even though its end point is called
``Logits``; renaming it would make the published checkpoint fail a strict load.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InceptionI3d",
    "Unit3D",
    "InceptionModule",
    "MaxPool3dSamePadding",
    "FeatureExtractor",
    "I3DStateDictExtractor",
    "I3DTorchScriptExtractor",
    "build_i3d",
    "load_i3d_state_dict",
    "load_i3d_torchscript",
    "STATE_DICT_SOURCE",
    "TORCHSCRIPT_SOURCE",
]

STATE_DICT_SOURCE = (
    "the pytorch-i3d / VideoGPT release (i3d_pretrained_400.pt, the file VideoGPT's and TATS's FVD "
    "code fetch; pytorch-i3d's rgb_imagenet.pt has the same layout)"
)
TORCHSCRIPT_SOURCE = (
    "StyleGAN-V's release (i3d_torchscript.pt, the detector its FVD metric code fetches)"
)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (front, back) for one dimension of length ``size``."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    front = total // 2
    return front, total - front


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = x.shape[-3:]
    pt = _same_pad(t, kernel[0], stride[0])
    ph = _same_pad(h, kernel[1], stride[1])
    pw = _same_pad(w, kernel[2], stride[2])
    return F.pad(x, (*pw, *ph, *pt))


def _triple(v: int | tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 3:
        raise ValueError(f"expected 3 values, got {v}")
    return v  # type: ignore[return-value]


class MaxPool3dSamePadding(nn.MaxPool3d):
    """Max pooling with TF "SAME" zero padding computed from each input's size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_same(x, _triple(self.kernel_size), _triple(self.stride))
        return super().forward(x)


class Unit3D(nn.Module):
    """Conv3d (no bias unless asked) + BatchNorm3d(eps=1e-3, momentum=0.01) + ReLU, "SAME" padding."""

    def __init__(
        self,
        in_channels: int,
        output_channels: int,
        kernel_shape=(1, 1, 1),
        stride=(1, 1, 1),
        activation_fn: Callable[[torch.Tensor], torch.Tensor] | None = F.relu,
        use_batch_norm: bool = True,
        use_bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_shape = _triple(kernel_shape)
        self.stride = _triple(stride)
        self.activation_fn = activation_fn
        self.use_batch_norm = use_batch_norm
        self.conv3d = nn.Conv3d(
            in_channels, output_channels, self.kernel_shape, stride=self.stride, padding=0, bias=use_bias
        )
        if use_batch_norm:
            self.bn = nn.BatchNorm3d(output_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel_shape, self.stride))
        if self.use_batch_norm:
            x = self.bn(x)
        if self.activation_fn is not None:
            x = self.activation_fn(x)
        return x


class InceptionModule(nn.Module):
    """Four branches (1x1; 1x1->3x3; 1x1->3x3; maxpool->1x1) concatenated on channels.

    ``out`` is ``[b0, b1a, b1b, b2a, b2b, b3b]`` output channels.
    """

    def __init__(self, in_channels: int, out: list[int]) -> None:
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0], (1, 1, 1))
        self.b1a = Unit3D(in_channels, out[1], (1, 1, 1))
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3], (1, 1, 1))
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3a = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=0)
        self.b3b = Unit3D(in_channels, out[5], (1, 1, 1))
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


class InceptionI3d(nn.Module):
    """Inflated Inception-v1 (I3D), parameter names as in the public ``pytorch-i3d`` code.

    ``forward(x)`` takes ``[B, in_channels, T, H, W]`` in ``[-1, 1]`` and returns per-time-step
    logits ``[B, num_classes, T']``. ``extract_features(x)`` returns those logits averaged over
    time, ``[B, num_classes]``: the FVD feature of VideoGPT/TATS-style evaluation.
    """

    VALID_ENDPOINTS = (
        "Conv3d_1a_7x7",
        "MaxPool3d_2a_3x3",
        "Conv3d_2b_1x1",
        "Conv3d_2c_3x3",
        "MaxPool3d_3a_3x3",
        "Mixed_3b",
        "Mixed_3c",
        "MaxPool3d_4a_3x3",
        "Mixed_4b",
        "Mixed_4c",
        "Mixed_4d",
        "Mixed_4e",
        "Mixed_4f",
        "MaxPool3d_5a_2x2",
        "Mixed_5b",
        "Mixed_5c",
    )

    def __init__(self, num_classes: int = 400, in_channels: int = 3, dropout_keep_prob: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, (1, 1, 1))
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=0)
        self.Mixed_3b = InceptionModule(192, [64, 96, 128, 16, 32, 32])
        self.Mixed_3c = InceptionModule(256, [128, 128, 192, 32, 96, 64])
        self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=0)
        self.Mixed_4b = InceptionModule(480, [192, 96, 208, 16, 48, 64])
        self.Mixed_4c = InceptionModule(512, [160, 112, 224, 24, 64, 64])
        self.Mixed_4d = InceptionModule(512, [128, 128, 256, 24, 64, 64])
        self.Mixed_4e = InceptionModule(512, [112, 144, 288, 32, 64, 64])
        self.Mixed_4f = InceptionModule(528, [256, 160, 320, 32, 128, 128])
        self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding(kernel_size=(2, 2, 2), stride=(2, 2, 2), padding=0)
        self.Mixed_5b = InceptionModule(832, [256, 160, 320, 32, 128, 128])
        self.Mixed_5c = InceptionModule(832, [384, 192, 384, 48, 128, 128])
        # End point "Logits": average pool, dropout, 1x1x1 conv with bias. The attribute is
        # ``logits`` in the public implementation (and hence in its checkpoints).
        self.dropout = nn.Dropout(1.0 - dropout_keep_prob)
        self.logits = Unit3D(
            1024, num_classes, (1, 1, 1), activation_fn=None, use_batch_norm=False, use_bias=True
        )

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        # The reference uses AvgPool3d(kernel=[2, 7, 7], stride=1), which is exact for 224x224
        # inputs (7x7 maps at Mixed_5c). Clamping the window keeps smaller inputs (tests) working
        # and is identical at 224x224.
        t, h, w = x.shape[-3:]
        return F.avg_pool3d(x, kernel_size=(min(2, t), min(7, h), min(7, w)), stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.VALID_ENDPOINTS:
            x = getattr(self, name)(x)
        x = self.logits(self.dropout(self._pool(x)))  # [B, C, T', H', W']
        return x.mean(dim=(3, 4))  # 1x1 spatially at 224x224, so this is the reference squeeze

    @torch.no_grad()
    def extract_features(self, videos: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` in ``[-1, 1]`` -> ``[B, num_classes]`` logits averaged over time.

        The time-averaged 400-d Kinetics logits are the FVD feature of VideoGPT and TATS (their
        ``get_fvd_logits``); StyleGAN-V's TorchScript detector instead returns its own 400-d
        features, so numbers from the two extractors are not interchangeable.
        """
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must be [B, 3, T, H, W], got shape {tuple(videos.shape)}")
        return self.forward(videos).mean(dim=2)


def build_i3d(num_classes: int = 400) -> InceptionI3d:
    """A randomly initialised InceptionI3d in eval mode."""
    return InceptionI3d(num_classes=num_classes).eval()


def _require_file(path: str | Path, what: str, source: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"I3D {what} not found: {str(p)!r}. It is usually obtained from {source}. "
            "Nothing is downloaded automatically: fetch the file yourself and pass its path."
        )
    return p


class FeatureExtractor:
    """``extractor(videos)``: ``[B, 3, T, H, W]`` float in ``[-1, 1]`` -> ``[B, D]`` float32 (CPU)."""

    name: str = "extractor"
    feature_dim: int | None = None

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: str | torch.device = "cpu",
                 name: str = "extractor", feature_dim: int | None = None) -> None:
        self.fn = fn
        self.device = torch.device(device)
        self.name = name
        self.feature_dim = feature_dim

    def _run(self, videos: torch.Tensor) -> torch.Tensor:
        return self.fn(videos)

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must be [B, 3, T, H, W], got shape {tuple(videos.shape)}")
        feats = self._run(videos.to(self.device, torch.float32))
        feats = feats.reshape(feats.shape[0], -1)
        return feats.detach().to("cpu", torch.float32)


class I3DStateDictExtractor(FeatureExtractor):
    """The pytorch-i3d InceptionI3d: time-averaged 400-d logits (VideoGPT/TATS FVD)."""

    def __init__(self, model: InceptionI3d, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        super().__init__(self.model.extract_features, device, "i3d_state_dict", model.num_classes)


class I3DTorchScriptExtractor(FeatureExtractor):
    """StyleGAN-V's TorchScript I3D, fed ``[0, 255]``-range floats with its detector kwargs."""

    DETECTOR_KWARGS = {"rescale": False, "resize": False, "return_features": True}

    def __init__(self, module, device: str | torch.device = "cpu") -> None:
        self.module = module
        super().__init__(self._forward, device, "i3d_torchscript", 400)

    def _forward(self, videos: torch.Tensor) -> torch.Tensor:
        # StyleGAN-V passes uint8-range values ([0, 255]) as float with rescale=False.
        x = (videos.clamp(-1.0, 1.0) + 1.0) * 127.5
        return self.module(x, **self.DETECTOR_KWARGS)


def load_i3d_state_dict(path: str | Path, device: str | torch.device = "cpu",
                        num_classes: int = 400) -> I3DStateDictExtractor:
    """Build InceptionI3d and load ``path`` (e.g. ``i3d_pretrained_400.pt``) with ``strict=True``.

    Returns an ``I3DStateDictExtractor``; its ``.model`` is the network.
    """
    p = _require_file(path, "state dict", STATE_DICT_SOURCE)
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{str(p)!r} does not hold a state dict (got {type(state).__name__})")
    model = InceptionI3d(num_classes=num_classes)
    model.load_state_dict(state, strict=True)
    return I3DStateDictExtractor(model.eval(), device)


def load_i3d_torchscript(path: str | Path, device: str | torch.device = "cpu") -> I3DTorchScriptExtractor:
    """Load StyleGAN-V's ``i3d_torchscript.pt`` with ``torch.jit.load`` and wrap it."""
    p = _require_file(path, "TorchScript detector", TORCHSCRIPT_SOURCE)
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; still the format
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(p), map_location=torch.device(device))
    module.eval()
    return I3DTorchScriptExtractor(module, device)
