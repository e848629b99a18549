"""The Denoiser protocol: teacher, student and critic are all Denoisers (see DESIGN.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.conditioning import Conditioning
from distill.schedule import Schedule


class Denoiser(nn.Module):
    """A network that predicts, from ``x_t`` at time ``t`` (``[B]`` or per-frame ``[B, T]``), its
    schedule's native target. Subclasses implement :meth:`forward`; guidance and the conversion to
    ``x0`` are shared here so that no loss re-derives them."""

    def __init__(self, schedule: Schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, **kwargs) -> Tensor:
        raise NotImplementedError

    def guided(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: float = 1.0, **kwargs) -> Tensor:
        """Native prediction with classifier-free guidance (Ho & Salimans 2022), one batched forward."""
        if guidance == 1.0:
            return self(x_t, t, cond, **kwargs)
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        pred_cond, pred_uncond = self(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.with_guidance_batch(),
                                      **kwargs).chunk(2)
        return pred_uncond + guidance * (pred_cond - pred_uncond)

    def denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance: float = 1.0, **kwargs) -> Tensor:
        """The clean-sample estimate ``x0`` (guidance applied)."""
        return self.schedule.split(x_t, t, self.guided(x_t, t, cond, guidance, **kwargs))[0]
