"""``os-plus``: Outlier Suppression+ (Wei et al., 2023), channel-wise shift and scale, folded.

A PTQ4ARVG baseline (method.md §7 lists OS+ among the compared methods; its VAR-d16 W8A8 row
is FID 4.11). Per input channel ``c`` of a region's sinks, from the observed range::

    z_c = (max_c + min_c) / 2                 shift: the channel's midpoint (sym-shift{formula=midpoint})
    h_c = (max_c - min_c) / 2                 the half-range left after the shift
    s_c = max(1, h_c / t)                     scale: channels wider than t are squeezed to t

The activation becomes ``(x - z) / s`` (folded into the norm/AdaLN/linear source, ``passes/regions.py``),
the sinks ``W·diag(s)`` and ``b + W z``: the float model is unchanged. A region whose source has
no place for a shift (AdaLN without a shift term) is skipped with a note.

``t`` is an option; ``t=0`` (default) searches it per region among ``grid`` quantiles of ``h``
(the largest, ``s = 1``: shift only, is always a candidate), keeping the one with the lowest
closed-form output error of a W/A-bit symmetric linear (``threshold_error``)::

    E(t) = dA^2/12 · ||W'||_F^2 + sum_o dW_o^2/12 · sum_c h'_c^2/3
    h'_c = min(h_c, t),  W' = W·diag(s),  dA = max_c h'_c / (2^(a-1) - 1),  dW_o = max_c |W'_oc| / (2^(w-1) - 1)

(activation noise through the weights plus weight noise times the activation energy of a channel
uniform on ``[-h', h']``). Not replicated: OS+ searches ``t`` on the calibration data by the
quantized layer's output MSE (and, in its LLM form, per attention block); this proxy needs only
the ranges the observers keep and the weights. Per region, ``ctx.stats[<sink>]`` records
``os_plus_scale``, ``os_plus_shift`` and ``os_plus_threshold``.
"""
from __future__ import annotations

import torch

from passes.infra import PassContext, register
from passes.quantize import act_bits, weight_bits
from passes.regions import FoldingPass, Region

EPS = 1e-8


def os_plus_transform(lo: torch.Tensor, hi: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, z)`` of OS+ from per-channel min/max and the threshold ``t``."""
    lo, hi = lo.double(), hi.double()
    half = ((hi - lo) / 2).clamp(min=EPS)
    return (half / max(t, EPS)).clamp(min=1.0), (hi + lo) / 2


def threshold_error(half: torch.Tensor, w: torch.Tensor, t: float, a_bits: int, w_bits: int) -> float:
    """``E(t)`` of the module docstring: ``half`` ``[C]``, ``w`` ``[outputs, C]``."""
    s = (half / t).clamp(min=1.0)
    h = half / s
    w = w.detach().double() * s
    da = h.max() / (2 ** (a_bits - 1) - 1)
    dw = w.abs().amax(1) / (2 ** (w_bits - 1) - 1)
    return float(da ** 2 / 12 * w.pow(2).sum() + (dw ** 2 / 12).sum() * (h ** 2 / 3).sum())


def search_threshold(half: torch.Tensor, w: torch.Tensor, a_bits: int, w_bits: int, grid: int = 32) -> float:
    """The candidate ``t`` (quantiles of ``half``) with the lowest ``threshold_error`` (first on ties)."""
    half = half.double().clamp(min=EPS)
    candidates = torch.quantile(half, torch.linspace(0, 1, max(grid, 2), dtype=torch.float64)).unique()
    errors = [threshold_error(half, w, float(t), a_bits, w_bits) for t in candidates]
    return float(candidates[min(range(len(errors)), key=errors.__getitem__)])


@register
class OSPlus(FoldingPass):
    """Options: ``t`` (0: search per region), ``grid`` (candidates of the search), ``bits`` /
    ``w_bits`` the search assumes (0: the compilation's), ``compensate`` (``passes/regions.py``)."""

    name = "os-plus"
    stat_key = "os_plus_scale"
    folds_shift = True
    t: float = 0.0
    grid: int = 32
    bits: int = 0
    w_bits: int = 0
    compensate: bool = False

    def plan(self, gm, ctx: PassContext, region: Region, shared=None) -> tuple[torch.Tensor, torch.Tensor]:
        obs = self.input_stats(ctx, region)
        lo, hi = obs.min.double(), obs.max.double()
        t = self.t
        if t <= 0:
            t = search_threshold(((hi - lo) / 2), region.sink_weights(gm), act_bits(self.bits, ctx),
                                 weight_bits(self.w_bits, ctx), self.grid)
        scale, shift = os_plus_transform(lo, hi, t)
        for site in region.sink_sites:
            stats = ctx.stats.setdefault(site, {})
            stats["os_plus_shift"], stats["os_plus_threshold"] = shift.float(), t
        return scale, shift
