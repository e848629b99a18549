"""What a denoiser is conditioned on: text embeddings (and the negative prompt for CFG), image latents."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """A batch of conditions. ``text`` is ``[B, L, D]``; masks are ``[B, L]`` (True = real token).

    ``negative_text`` is the unconditional/negative context used by classifier-free guidance;
    ``image`` holds image latents for image-to-video models; ``frame_offset`` (``[B]``) is where in a long video
    each sample's clip starts, for models that read it (``WanDenoiser.offset_frames``; None: at its start).
    """

    text: Tensor
    text_mask: Tensor | None = None
    negative_text: Tensor | None = None
    negative_mask: Tensor | None = None
    image: Tensor | None = None
    frame_offset: Tensor | None = None

    def __post_init__(self) -> None:
        if self.text.ndim != 3:
            raise ValueError(f"Conditioning.text must be [B, L, D], got shape {tuple(self.text.shape)}")
        for name in ("text_mask", "negative_mask"):
            mask = getattr(self, name)
            if mask is not None and mask.ndim != 2:
                raise ValueError(f"Conditioning.{name} must be [B, L], got shape {tuple(mask.shape)}")
        if self.negative_text is not None and self.negative_text.shape[0] != self.text.shape[0]:
            raise ValueError(f"negative_text batch {self.negative_text.shape[0]} != text batch {self.text.shape[0]}")
        if self.frame_offset is not None and tuple(self.frame_offset.shape) != (self.text.shape[0],):
            raise ValueError(f"Conditioning.frame_offset must be [B] = ({self.text.shape[0]},), got shape "
                             f"{tuple(self.frame_offset.shape)}")

    def __len__(self) -> int:
        return self.text.shape[0]

    def _map(self, fn) -> "Conditioning":
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move tensors; ``dtype`` applies to floating tensors only (masks stay boolean)."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def index(self, idx: Tensor | slice) -> "Conditioning":
        """Select a sub-batch."""
        return self._map(lambda x: x[idx])

    def repeat(self, n: int) -> "Conditioning":
        """Every sample ``n`` times in a row."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def masked_text(self, negative: bool = False) -> Tensor:
        """Context with padded positions zeroed (as Wan zero-pads its T5 context)."""
        text, mask = (self.negative_text, self.negative_mask) if negative else (self.text, self.text_mask)
        if text is None:
            raise ValueError("no negative_text in this Conditioning: classifier-free guidance needs one")
        return text if mask is None else text * mask.unsqueeze(-1).to(text.dtype)

    def with_guidance_batch(self) -> "Conditioning":
        """Conditional and unconditional contexts stacked along the batch (one forward for CFG)."""
        text, negative = self.masked_text(), self.masked_text(negative=True)
        if negative.shape[1:] != text.shape[1:]:
            raise ValueError(f"negative_text {tuple(negative.shape)} must match text {tuple(text.shape)} "
                             "(encode both with the same max_length)")
        doubled = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
        return Conditioning(text=torch.cat([text, negative]), image=doubled(self.image),
                            frame_offset=doubled(self.frame_offset))


@dataclass
class Batch:
    """One micro-batch: clean latents ``[B, C, T, H, W]`` (None for prompt-only data), conditions, the
    captions/labels they came from (for logging and evaluation), and the latent shape to generate.
    ``extra`` holds per-sample tensors of other data kinds (ODE pairs: ``noise``, ``trajectory``)."""

    latents: Tensor | None
    cond: Conditioning
    captions: list[str]
    labels: list[dict]
    shape: tuple[int, ...] = ()
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shape:
            if self.latents is None:
                raise ValueError("a Batch without latents needs its latent shape")
            self.shape = tuple(self.latents.shape)

    def repeat(self, n: int) -> "Batch":
        """Every sample ``n`` times in a row (several samples of a loss made from one of the batch's)."""
        if n == 1:
            return self
        repeated = lambda items: [item for item in items for _ in range(n)]  # noqa: E731
        return replace(self, latents=None if self.latents is None else self.latents.repeat_interleave(n, dim=0),
                       cond=self.cond.repeat(n), captions=repeated(self.captions), labels=repeated(self.labels),
                       shape=(self.shape[0] * n, *self.shape[1:]),
                       extra={k: v.repeat_interleave(n, dim=0) for k, v in self.extra.items()})

    def first_of(self, n: int) -> "Batch":
        """The first of every ``n`` samples in a row: the batch that :meth:`repeat` (``n``) was made from."""
        if n == 1:
            return self
        pick = slice(None, None, n)
        return replace(self, latents=None if self.latents is None else self.latents[pick], cond=self.cond.index(pick),
                       captions=self.captions[pick], labels=self.labels[pick],
                       shape=(-(-self.shape[0] // n), *self.shape[1:]),
                       extra={k: v[pick] for k, v in self.extra.items()})
