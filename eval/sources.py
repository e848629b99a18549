"""Where evaluation videos come from: shard directories, folders of video files, or a model that generates them.

Every source yields float clips ``[3, T, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

VIDEO_SUFFIXES = (".mp4", ".gif", ".mov", ".mkv", ".webm", ".avi")


def _from_uint8(frames: np.ndarray) -> Tensor:
    """``[T, H, W, 3]`` uint8 -> ``[3, T, H, W]`` float in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def read_videos(source: str | Path, limit: int | None = None) -> Iterator[Tensor]:
    """Clips from a shard directory (pixel-space ``latents``) or a folder of video files."""
    from distill.data.shards import read_shards
    from distill.video import read_video

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"video source {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES) if path.is_dir() else []
    if files:
        clips: Iterator[Tensor] = (_from_uint8(read_video(f)) for f in files)
    elif path.suffix == ".tar" or (path.is_dir() and (list(path.glob("*.tar")) or (path / "index.json").exists())):
        clips = (sample["latents"].float() for sample in read_shards(path))
    else:
        raise FileNotFoundError(f"{path} holds neither video files {VIDEO_SUFFIXES} nor webdataset shards")
    for i, clip in enumerate(clips):
        if limit is not None and i >= limit:
            return
        if clip.ndim != 4 or clip.shape[0] != 3:
            raise ValueError(f"{path}: clip {i} has shape {tuple(clip.shape)}; expected pixel videos [3, T, H, W] "
                             "(latent shards need decoding first)")
        yield clip


def generate_videos(model_dir: str | Path, num: int, shape: tuple[int, int, int, int], device: torch.device,
                    batch_size: int = 64, guidance: float = 4.0, steps: int = 50) -> Tensor:
    """``num`` clips on the evaluation prompts from a model directory, with its own sampler (a student's step
    list, or a teacher's Euler steps with CFG)."""
    from distill.text import TextEncoder
    from eval.evaluate import eval_prompts, generate, load_sampler

    captions, _ = eval_prompts(num)
    sampler = load_sampler(model_dir, device, guidance, steps)
    videos, _ = generate(sampler, captions, TextEncoder.from_pretrained(device=device), shape, device, batch_size)
    return videos
