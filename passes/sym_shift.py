"""``sym-shift``: per-channel shift that makes each channel's range symmetric about zero.

The reference's ``calculate_sym_shift`` (method.md §3.4, §1 step 5) reads the shift off a
per-channel asymmetric b-bit min-max quantizer, on the unsigned grid ``[0, 2^b - 1]`` that
does not widen the range to contain zero (VAR/PAR)::

    delta_c = (max_c - min_c) / (2^b - 1),   z_c = round(-min_c / delta_c)
    p_c     = delta_c · (2^(b-1) - 1 - z_c)                      (formula="reference")

so that after ``x' = x - p`` the zero point sits at ``2^(b-1) - 1`` and the channel spans
``[-(2^(b-1) - 1)·delta_c, 2^(b-1)·delta_c]``. Relation to the natural centre
``m_c = (max_c + min_c) / 2`` (``formula="midpoint"``): writing ``z_c = -min_c/delta_c + e``
with ``|e| <= 1/2``, ``p_c = m_c - delta_c·(1/2 + e)``, i.e. ``m_c - delta_c <= p_c <= m_c``:
the reference centres to within one quantization step, and ``p_c`` is a whole number of
steps, so the channel's grid maps onto itself and its new zero point is the integer
``2^(b-1) - 1``.

The shift is folded into the source (LayerNorm/RMSNorm bias, AdaLN shift rows, a previous
linear's bias) and compensated in the sinks, ``b <- b + W·p`` (a bias is created when absent,
as for VAR's ``mat_qkv`` and LlamaGen's linears). The float model is unchanged. A region
whose source has no place for a shift (AdaLN without a shift term) is skipped with a note.
Bits default to the compilation's activation bits (``ctx.config.precision``).
"""
from __future__ import annotations

import torch

from core.errors import UserError
from passes.infra import PassContext, register
from passes.quantize import act_bits
from passes.regions import FoldingPass, Region


def reference_shift(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """``p_c = delta_c·(2^(b-1) - 1 - z_c)`` from per-channel min/max (method.md §3.4)."""
    delta = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-8)
    return delta * (2 ** (bits - 1) - 1 - torch.round(-lo / delta))


@register
class SymShift(FoldingPass):
    """Options: ``bits`` of the grid the shift is read from (0: the compilation's activation
    bits); ``formula`` ``reference`` (method.md §3.4) or ``midpoint``."""

    name = "sym-shift"
    stat_key = "sym_shift"
    folds_shift = True
    bits: int = 0
    formula: str = "reference"
    compensate: bool = False  # also fold regions whose source feeds a residual (passes/regions.py)

    def prepare(self, gm, ctx: PassContext, regions: list[Region]) -> None:
        if self.formula not in ("reference", "midpoint"):
            raise UserError(f"sym-shift: formula must be reference or midpoint, got {self.formula!r}")

    def plan(self, gm, ctx: PassContext, region: Region, shared=None) -> tuple[None, torch.Tensor]:
        obs = self.input_stats(ctx, region)
        lo, hi = obs.min.double(), obs.max.double()
        if self.formula == "midpoint":
            return None, (hi + lo) / 2
        return None, reference_shift(lo, hi, act_bits(self.bits, ctx))
