"""Micro-batches addressed by their index, so that a resumed run sees exactly the data it would have seen."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from distill.conditioning import Batch, Conditioning
from distill.config import DataConfig
from distill.data.shards import ShardDataset, collate
from distill.data.synthetic import MovingShapes
from distill.text import TextEncoder


class BatchSource:
    """``get(n)`` returns the ``n``-th micro-batch of this rank.

    Synthetic data is drawn statelessly from ``(seed, rank, n)``. Shards (and ODE-pair shards) are streamed in a fixed,
    seeded order; asking for an index other than the next one replays the stream up to it (only
    resumption does this).
    """

    def __init__(self, data: DataConfig, text_encoder: TextEncoder | None, device: torch.device, seed: int = 0,
                 rank: int = 0):
        self.data, self.text_encoder, self.device, self.seed, self.rank = data, text_encoder, device, seed, rank
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None
        self._stream: Iterator[dict] | None = None
        self._next = 0
        if data.kind == "synthetic":
            self.synthetic = MovingShapes(data.num_samples, data.frames, data.height, data.width, seed=seed,
                                          max_offset=data.max_offset)
            self._pool = self._render_pool(data.pool) if data.pool else None

    def _render_pool(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
        """Clips ``0 .. size-1`` with their text embeddings, rendered and encoded once and kept on the
        device: on a GPU, per-step rendering and encoding would otherwise cost more than the model."""
        items = [self.synthetic[i] for i in tqdm(range(size), desc="render pool", leave=False)]
        videos = torch.stack([item["video"] for item in items]).to(self.device)
        text, mask = zip(*(self._encode([item["caption"] for item in items[i:i + 256]])
                           for i in range(0, size, 256)))
        return videos, torch.cat(text), torch.cat(mask), items

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise ValueError("these batches need text embeddings: give BatchSource a text encoder")
        return self.text_encoder.encode(captions)

    def _conditioning(self, text: torch.Tensor, mask: torch.Tensor,
                      frame_offset: torch.Tensor | None = None) -> Conditioning:
        if self._negative is None:
            negative = self._precomputed_negative() or self._encode([self.data.negative_prompt])
            self._negative = tuple(x.to(self.device) for x in negative)
        neg, neg_mask = self._negative
        batch = text.shape[0]
        return Conditioning(text.to(self.device), mask.to(self.device), neg.expand(batch, -1, -1),
                            neg_mask.expand(batch, -1),
                            frame_offset=None if frame_offset is None else frame_offset.to(self.device))

    def _precomputed_negative(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``negative.safetensors`` (``text_emb`` ``[1, L, D]``, ``text_mask`` ``[1, L]``) beside shards whose
        embeddings come from a text encoder this process does not load (e.g. Wan's umT5)."""
        path = Path(self.data.path) / "negative.safetensors"
        if self.data.kind not in ("shards", "ode_pairs") or not path.is_file():
            return None
        tensors = load_file(str(path))
        return tensors["text_emb"].float(), tensors["text_mask"].bool()

    def _synthetic(self, n: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.rank, n])
        if self._pool is not None:
            videos, text, mask, items = self._pool
            index = torch.as_tensor(rng.integers(len(items), size=self.data.batch_size), device=self.device)
            items = [items[i] for i in index.tolist()]
            videos, text, mask = videos[index], text[index], mask[index]
        else:
            items = [self.synthetic[int(i)] for i in rng.integers(len(self.synthetic), size=self.data.batch_size)]
            videos = torch.stack([item["video"] for item in items]).to(self.device)
            text, mask = self._encode([item["caption"] for item in items])
        offsets = torch.tensor([item["offset"] for item in items]) if self.data.max_offset else None
        return Batch(videos, self._conditioning(text, mask, offsets), [item["caption"] for item in items],
                     [item["labels"] for item in items])

    def _shard(self, n: int) -> Batch:
        if self._stream is None or n != self._next:
            dataset = ShardDataset(self.data.path, shuffle_buffer=256, seed=self.seed, repeat=True,
                                   on_error=self.data.on_error)
            self._stream, self._next = iter(dataset), 0
            for _ in range(n * self.data.batch_size):
                next(self._stream)
            self._next = n
        samples = collate([next(self._stream) for _ in range(self.data.batch_size)])
        self._next += 1
        captions = samples["caption"]
        if "text_emb" in samples:
            text, mask = samples["text_emb"].float(), samples["text_mask"].bool()
        else:
            text, mask = self._encode(captions)
        if "latents" in samples:
            latents, shape = samples["latents"].float().to(self.device), ()  # the shape is the latents'
        else:  # prompt-only data: the job says what to generate
            d = self.data
            latents, shape = None, (len(captions), d.channels, d.frames, d.height, d.width)
        return Batch(latents, self._conditioning(text, mask), captions, samples["labels"], shape, self._ode_pairs(samples))

    def _ode_pairs(self, samples: dict) -> dict[str, torch.Tensor]:
        """The ``trajectory`` of teacher ODE-pair shards (``distill ode-pairs``), for the regression losses."""
        if self.data.kind != "ode_pairs":
            return {}
        missing = [k for k in ("noise", "trajectory", "latents") if k not in samples]
        if missing:
            raise ValueError(f"{self.data.path}: data.kind = 'ode_pairs' but the samples have no {missing} "
                             "(write them with `distill ode-pairs`)")
        return {"trajectory": samples["trajectory"].float().to(self.device)}  # its first state is the noise

    def get(self, n: int) -> Batch:
        return self._synthetic(n) if self.data.kind == "synthetic" else self._shard(n)
