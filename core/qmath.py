"""Integer quantization arithmetic: ranges, scales, zero points, fake quantization.

One place for the formulas every other module uses (observers, weight quantizers, Q/DQ ops,
the ONNX lowering). Integers are always stored as int8: a b-bit asymmetric grid is the signed
range [-2^(b-1), 2^(b-1)-1] with a zero point, which is the reference code's unsigned
[0, 2^b-1] grid shifted by 2^(b-1). Rounding is half-to-even, as ONNX QuantizeLinear does.
FP8 (E4M3, ``fp8=True``) grids are symmetric: codes ``x / scale`` stored as ``float8_e4m3fn``,
``scale = amax / 448``, zero point 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-8
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a b-bit grid."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bit width must be in 2..8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass
class QParams:
    """Quantization parameters of one tensor.

    `scale`/`zero_point` are 0-d for per-tensor, 1-d along `axis` for per-channel, and 1-d
    indexed by token group (`axis` is then the token axis of the activation) for per-group.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"  # tensor | channel | group
    axis: int = 0
    fp8: bool = False  # E4M3 codes (symmetric, bits 8) instead of integers

    @property
    def qmin(self) -> int:
        return qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits)[1]

    def describe(self) -> dict:
        s = self.scale.float()
        return {
            "granularity": self.granularity,
            "bits": self.bits,
            **({"format": "fp8"} if self.fp8 else {}),
            "symmetric": self.symmetric,
            "axis": self.axis if self.granularity != "tensor" else None,
            "n_scales": int(s.numel()),
            "scale_min": float(s.min()),
            "scale_max": float(s.max()),
            "zero_point_min": int(self.zero_point.min()),
            "zero_point_max": int(self.zero_point.max()),
        }


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and int8 zero point that map [lo, hi] (elementwise tensors) onto the b-bit grid.

    The range is widened to contain 0 so that 0 is exact (padding, masked tokens).
    """
    qmin, qmax = qrange(bits)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=_EPS)
        zp = torch.zeros_like(scale, dtype=torch.int8)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int8)
    return scale, zp


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The FP8 (E4M3) scale that maps ``amax`` (elementwise) onto 448."""
    return (amax.float() / FP8_MAX).clamp(min=_EPS)


def fp8_qparams(lo: torch.Tensor, hi: torch.Tensor) -> QParams:
    """The per-channel (axis 0) FP8 grid covering ``[lo, hi]`` of each row."""
    scale = fp8_scale(torch.maximum(-lo, hi))
    return QParams(scale, torch.zeros_like(scale, dtype=torch.int8), 8, True, "channel", 0, fp8=True)


def fp8_codes(y: torch.Tensor) -> torch.Tensor:
    """``y`` (already divided by its scale) as E4M3 codes, saturated at +-448 (the cast alone would overflow)."""
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _broadcast(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def broadcast_like(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against ``x``: 0-d (per tensor), 1-d along ``axis``
    (per channel), or blocked, with ``x``'s rank and each entry covering ``x.shape[axis] / t.shape[axis]``
    consecutive elements along ``axis`` (ONNX's ``block_size``; group-wise 4-bit weights)."""
    if t.dim() > 1 and t.dim() == x.dim():
        return t.repeat_interleave(x.shape[axis] // t.shape[axis], dim=axis)
    return _broadcast(t, x.dim(), axis)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    s = broadcast_like(scale, x, axis).to(x.dtype)
    z = broadcast_like(zero_point, x, axis).to(x.dtype)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int8)


def quantize_as(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``x``'s codes on ``qp``'s grid: int8, or float8_e4m3fn for an FP8 grid."""
    if qp.fp8:
        return fp8_codes(x / broadcast_like(qp.scale, x, qp.axis).to(x.dtype))
    return quantize(x, qp.scale, qp.zero_point, qp.axis, qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    s = broadcast_like(scale, q, axis).float()
    z = broadcast_like(zero_point, q, axis).float()
    return (q.float() - z) * s


def fake_quant(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize with per-tensor or per-channel params (per-group is lowered elsewhere)."""
    return dequantize(quantize_as(x, qp), qp.scale, qp.zero_point, qp.axis).to(x.dtype)


@dataclass(frozen=True)
class Precision:
    """A compilation's bit widths, e.g. ``W8A8``: weights and activations (the deployed kernels are int8).

    ``group``: at 4 bits or fewer, a tensor gets one scale per ``group`` consecutive input channels
    (Shift-and-Sum's groups of 128; ``group_size`` shrinks it for narrow layers); 0: per channel
    (weights) or per tensor / token group (activations), as at 6 and 8 bits.
    """

    name: str
    weight: int
    act: int
    group: int = 0

    def groups(self, bits: int) -> int:
        """The group size for a ``bits``-bit tensor of this compilation (0: no channel groups)."""
        return self.group if self.group and bits <= 4 else 0


PRECISIONS = {p.name: p for p in (Precision("W8A8", 8, 8), Precision("W6A6", 6, 6), Precision("W4A8", 4, 8),
                                  Precision("W4A6", 4, 6, 128), Precision("W4A4", 4, 4, 128))}


def group_size(width: int, group: int) -> int:
    """``group`` when it divides ``width``, else the largest divisor of ``width`` below it (a tiny
    model's 96 channels get groups of 96, 48 of 48, 80 of 40)."""
    return max(d for d in range(1, min(group, width) + 1) if width % d == 0)


def precision(name: str, where: str = "--bits") -> Precision:
    """``"W8A8"`` -> its Precision; anything else is a UserError naming ``where`` and the choices."""
    from core.errors import UserError

    if name not in PRECISIONS:
        raise UserError(f"{where} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]

def scale_shift(value: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``(value - shift) / scale`` in float64, either part optional."""
    v = value.double()
    if shift is not None:
        v = v - shift
    if scale is not None:
        v = v / scale
    return v
