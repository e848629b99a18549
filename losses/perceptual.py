"""LPIPS (Zhang et al. 2018) from local weights only.

The lpips package fetches its backbone from torchvision's hub on construction; here the network is built with a
random backbone and then filled from one local safetensors state dict, so nothing is downloaded. Make that file once
from the official weight files with :func:`convert_lpips` (both read with ``weights_only=True``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

NETS = ("alex", "vgg", "squeeze")


def _empty_lpips(net: str) -> nn.Module:
    import lpips

    if net not in NETS:
        raise ValueError(f"LPIPS backbone {net!r}; expected one of {list(NETS)}")
    with warnings.catch_warnings():  # torchvision's notice about its deprecated `pretrained` argument
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)


def load_lpips(path: str | Path, net: str = "alex") -> nn.Module:
    """A frozen LPIPS network from a safetensors file of ``lpips.LPIPS(net=net)`` at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method.consistency.lpips_path: {path} does not exist; LPIPS needs a local "
                                "safetensors file of lpips.LPIPS (backbone and linear layers), made once with "
                                "losses.perceptual.convert_lpips from the official weight files")
    model = _empty_lpips(net)
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is not an lpips.LPIPS(net={net!r}) file: {str(err)[:300]}") from None
    return model.requires_grad_(False).eval()


def convert_lpips(backbone: str | Path, linear: str | Path, out: str | Path, net: str = "alex") -> Path:
    """One safetensors file from torchvision's backbone weights (e.g. ``alexnet-owt-7be5be79.pth``) and the lpips
    package's linear layers (``lpips/weights/v0.1/alex.pth``): the backbone's ``features.<i>.*`` become
    ``net.slice<k>.<i>.*`` as lpips slices them."""
    model = _empty_lpips(net)
    trunk = torch.load(backbone, map_location="cpu", weights_only=True)
    state = dict(torch.load(linear, map_location="cpu", weights_only=True))
    for key in model.state_dict():
        if key.startswith("net.slice"):
            _, _, index, param = key.split(".", 3)
            state[key] = trunk[f"features.{index}.{param}"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("scaling_layer", "lins."))]  # constants; aliases of lin<k>
    if missing or unexpected:
        raise KeyError(f"{backbone} + {linear} do not make lpips.LPIPS(net={net!r}): missing {missing[:4]}, "
                       f"unexpected {unexpected[:4]}")
    save_model(model, str(out))
    return Path(out)


def lpips_frames(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean LPIPS between the frames of two pixel-space clips ``[B, 3, T, H, W]`` in ``[-1, 1]``."""
    def frames(v: Tensor) -> Tensor:
        return v.transpose(1, 2).flatten(0, 1).to(next(model.parameters()).dtype)

    return model(frames(x), frames(y)).float().mean()
