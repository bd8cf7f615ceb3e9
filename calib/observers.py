"""Streaming activation statistics, one observer per quantizable tensor (site + role).

Observers keep O(channels) state, never the activations, so memory does not grow with the
number of calibration samples. The channel axis is the last one (``[..., C]``), which holds
for every linear input and attention operand we observe.
"""
from __future__ import annotations

import torch

from passes.diagnostics import UserError


class TensorObserver:
    """Per-channel min / max / absmax / sum of squares and element count of a stream of tensors."""

    def __init__(self, name: str):
        self.name = name
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0
        self.batches = 0

    def update(self, x: torch.Tensor, *, step: int | None = None) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            where = f" at calibration step {step}" if step is not None else f" in batch {self.batches}"
            raise UserError(f"non-finite activation (NaN/Inf) at {self.name}{where}: check the model or its inputs")
        flat = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
        lo, hi = flat.amin(0), flat.amax(0)
        sq = flat.double().pow(2).sum(0)
        if self.min is None:
            self.min, self.max, self.sumsq = lo, hi, sq
        else:
            self.min = torch.minimum(self.min, lo)
            self.max = torch.maximum(self.max, hi)
            self.sumsq = self.sumsq + sq
        self.count += flat.shape[0]
        self.batches += 1

    @property
    def channels(self) -> int:
        return 0 if self.min is None else int(self.min.numel())

    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    def summary(self) -> dict:
        if self.min is None:
            return {"observed": False}
        return {
            "observed": True,
            "channels": self.channels,
            "rows": self.count,
            "min": float(self.min.min()),
            "max": float(self.max.max()),
            "absmax_channel_ratio": float(self.absmax().max() / self.absmax().median().clamp(min=1e-12)),
        }
