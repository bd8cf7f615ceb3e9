"""Our quantize / dequantize ops and their ONNX translation.

Separate Q and DQ nodes (not a fused fake-quant) so the graph says exactly what the deployed
model does: Q yields int8, DQ consumes int8. `torch.library` gives them a real CPU kernel, a
fake kernel for tracing/export, and a stable name (`torch.ops.arvgq.*`) that survives fx and
torch.export. `ONNX_TRANSLATIONS` maps them to QuantizeLinear/DequantizeLinear for the dynamo
exporter's `custom_translation_table`.

A scale with one element is per-tensor (`axis` is then ignored, as in ONNX); a 1-d scale is
per-channel along `axis`. Bit widths below 8 are carried by `qmin/qmax`: the kernel clamps to
them. ONNX has no b-bit Q, so the translation clamps the input to the grid's float range
first (Clip for a per-tensor grid, Max/Min per channel), then quantizes to int8: identical numbers.
"""
from __future__ import annotations

import math

import torch
from onnxscript import opset19 as op

from core import qmath


@torch.library.custom_op("arvgq::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    return qmath.quantize(x, scale, zero_point, axis, qmin, qmax)


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, axis, qmin, qmax):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("arvgq::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    return qmath.dequantize(q, scale, zero_point, axis)


@dequantize.register_fake
def _dequantize_fake(q, scale, zero_point, axis):
    return torch.empty_like(q, dtype=torch.float32)


Q = torch.ops.arvgq.quantize.default
DQ = torch.ops.arvgq.dequantize.default


def _onnx_quantize(x, scale, zero_point, axis: int, qmin: int, qmax: int):
    if qmin > -128 or qmax < 127:
        # Float bounds of the b-bit grid, (q - zp) * scale for q in {qmin, qmax}. Per-channel
        # bounds are [C] and broadcast over the last axis: insert-qdq only emits reduced-bit
        # per-channel Q on channel-last activations (weights are quantized offline, no Q).
        zp = op.Cast(zero_point, to=1)
        lo = op.Mul(op.Sub(op.Constant(value_float=float(qmin)), zp), scale)
        hi = op.Mul(op.Sub(op.Constant(value_float=float(qmax)), zp), scale)
        if _is_scalar(scale):
            # Clip, not Min(Max(.)): the exporter's optimizer rewrites a scalar Min(Max(x, c1), c2)
            # into Clip with initializers named "<x>_min"/"<x>_max"; when several reduced-bit Q
            # nodes read the same tensor (q, k and v of one LayerNorm) those names collide and the
            # renamed ones are never emitted: onnxruntime rejects the model (issue 20, W6A6).
            x = op.Clip(x, op.Squeeze(lo), op.Squeeze(hi))
        else:
            x = op.Min(op.Max(x, lo), hi)
    return op.QuantizeLinear(x, scale, zero_point, axis=axis)


def _is_scalar(value) -> bool:
    """True when an exporter value is known to hold one element (a per-tensor scale)."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return False
    try:
        return all(int(d) == 1 for d in shape)
    except (TypeError, ValueError):  # a symbolic dimension
        return False


def _onnx_dequantize(q, scale, zero_point, axis: int):
    shape = getattr(scale, "shape", None)
    if shape is not None and len(shape) > 1:
        return _blocked_dequantize(q, scale, zero_point, axis)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _blocked_dequantize(q, scale, zero_point, axis: int):
    """Group-wise weights (scale ``[out, in / g]`` on the last axis) at opset 19: the codes reshaped to
    ``[out * in / g, g]`` take a per-axis DequantizeLinear on axis 0, then the original shape. The
    same numbers as opset 21's blocked DequantizeLinear (``block_size=g``), which would need the
    whole model at opset 21."""
    rank = len(scale.shape)
    if axis % rank != rank - 1:
        raise ValueError(f"blocked dequantization is only exported along the last axis, got axis {axis}")
    block = int(q.shape[-1]) // int(scale.shape[-1])
    flat = op.Reshape(q, op.Constant(value_ints=[-1, block]))
    one_d = op.Constant(value_ints=[-1])
    dq = op.DequantizeLinear(flat, op.Reshape(scale, one_d), op.Reshape(zero_point, one_d), axis=0)
    return op.Reshape(dq, op.Shape(q))


ONNX_TRANSLATIONS = {Q: _onnx_quantize, DQ: _onnx_dequantize}


@torch.library.custom_op("arvgq::dynamic_token_fake_quant", mutates_args=())
def dynamic_token_fake_quant(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-token fake quantization with the grid computed from the live tensor (DTWQ): each row of
    the last axis gets ``qmath.qparams_from_range(min, max)`` (widened to contain 0), then Q/DQ.
    Exported by ``_onnx_dynamic_token_fake_quant`` (QuantizeLinear with a scale computed per row)."""
    return dynamic_fake_quant(x, bits, symmetric)


@dynamic_token_fake_quant.register_fake
def _dynamic_token_fake_quant_fake(x, bits, symmetric):
    return torch.empty_like(x)


DYNAMIC_TOKEN_FQ = torch.ops.arvgq.dynamic_token_fake_quant.default


def _onnx_dynamic_token_fake_quant(x, bits: int, symmetric: bool):
    """DTWQ in ONNX: the rows of the last axis become the rows of a ``[N, C]`` view, each row's grid
    is computed the way ``qmath.qparams_from_range`` does (ReduceMin/ReduceMax widened to contain 0),
    and a per-axis (axis 0) QuantizeLinear/DequantizeLinear takes those run-time scales. TensorRT
    needs build-time scales, so its Q/DQ lint flags these nodes (``constant-scale``)."""
    qmin, qmax = qmath.qrange(bits)
    shape = op.Shape(x)
    rows = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))
    zero = op.Constant(value_float=0.0)
    lo = op.Min(op.ReduceMin(rows, op.Constant(value_ints=[1]), keepdims=0), zero)
    hi = op.Max(op.ReduceMax(rows, op.Constant(value_ints=[1]), keepdims=0), zero)
    eps = op.Constant(value_float=qmath._EPS)
    if symmetric:
        scale = op.Max(op.Div(op.Max(op.Neg(lo), hi), op.Constant(value_float=float(qmax))), eps)
        zp = op.Cast(op.Mul(lo, zero), to=3)  # int8 zeros, one per row
    else:
        scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=float(qmax - qmin))), eps)
        zp = op.Cast(op.Clip(op.Round(op.Sub(op.Constant(value_float=float(qmin)), op.Div(lo, scale))),
                             op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax))), to=3)
    if qmin > -128 or qmax < 127:  # the b-bit grid's float bounds per row, as in _onnx_quantize
        zpf, col = op.Cast(zp, to=1), op.Constant(value_ints=[1])
        rows = op.Min(op.Max(rows, op.Unsqueeze(op.Mul(op.Sub(op.Constant(value_float=float(qmin)), zpf), scale), col)),
                      op.Unsqueeze(op.Mul(op.Sub(op.Constant(value_float=float(qmax)), zpf), scale), col))
    q = op.QuantizeLinear(rows, scale, zp, axis=0)
    return op.Reshape(op.DequantizeLinear(q, scale, zp, axis=0), shape)


@torch.library.custom_op("arvgq::dynamic_tensor_fake_quant_u8", mutates_args=())
def dynamic_tensor_fake_quant_u8(x: torch.Tensor) -> torch.Tensor:
    """ONNX ``DynamicQuantizeLinear`` then ``DequantizeLinear``: one uint8 asymmetric grid per tensor
    from the live range widened to contain 0, ``scale = (max - min) / 255``,
    ``zp = clamp(round(-min / scale), 0, 255)`` (the operator's definition)."""
    xf = x.float()
    lo, hi = torch.clamp(xf.amin(), max=0.0), torch.clamp(xf.amax(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:  # an all-zero tensor: every code is the zero point
        return torch.zeros_like(x)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(xf / scale) + zp, 0, 255)
    return ((q - zp) * scale).to(x.dtype)


@dynamic_tensor_fake_quant_u8.register_fake
def _dynamic_tensor_fake_quant_u8_fake(x):
    return torch.empty_like(x)


DYNAMIC_TENSOR_FQ_U8 = torch.ops.arvgq.dynamic_tensor_fake_quant_u8.default


def _onnx_dynamic_tensor_fake_quant_u8(x):
    y, scale, zp = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(y, scale, zp)


ONNX_TRANSLATIONS[DYNAMIC_TOKEN_FQ] = _onnx_dynamic_token_fake_quant
ONNX_TRANSLATIONS[DYNAMIC_TENSOR_FQ_U8] = _onnx_dynamic_tensor_fake_quant_u8


_LOG2_SCALE = -2.0 / math.log(2.0)  # -log_sqrt2(t) = -2 ln(t) / ln 2


@torch.library.custom_op("arvgq::log_sqrt2_fake_quant", mutates_args=())
def log_sqrt2_fake_quant(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """RepQ-ViT's log-sqrt(2) quantizer of non-negative values (softmax outputs), in float::

        q = round(-2 log2(x / delta)),  x' = delta * 2^(-clamp(q, 0, 2^b - 1) / 2),  x' = 0 where q >= 2^b

    ``2^(-q/2)`` is RepQ-ViT's ``2^(-ceil(q/2)) * (sqrt(2) if q is odd else 1)``. There is no integer
    ONNX form: the translation is the same float arithmetic (Log, Round, Clip, Pow, Where)."""
    levels = 2 ** bits
    xf = x.float()
    q = torch.round(torch.log(xf / delta.float()) * _LOG2_SCALE)
    out = delta.float() * torch.pow(2.0, torch.clamp(q, 0, levels - 1) * -0.5)
    return torch.where(q >= levels, torch.zeros_like(out), out).to(x.dtype)


@log_sqrt2_fake_quant.register_fake
def _log_sqrt2_fake_quant_fake(x, delta, bits):
    return torch.empty_like(x)


LOG_SQRT2_FQ = torch.ops.arvgq.log_sqrt2_fake_quant.default


def _onnx_log_sqrt2_fake_quant(x, delta, bits: int):
    levels = float(2 ** bits)
    q = op.Round(op.Mul(op.Log(op.Div(x, delta)), op.Constant(value_float=_LOG2_SCALE)))
    clipped = op.Clip(q, op.Constant(value_float=0.0), op.Constant(value_float=levels - 1))
    out = op.Mul(delta, op.Pow(op.Constant(value_float=2.0), op.Mul(clipped, op.Constant(value_float=-0.5))))
    return op.Where(op.GreaterOrEqual(q, op.Constant(value_float=levels)), op.Constant(value_float=0.0), out)


ONNX_TRANSLATIONS[LOG_SQRT2_FQ] = _onnx_log_sqrt2_fake_quant


def dynamic_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, group: int = 0, split: bool = False,
                       dim: int = -1) -> torch.Tensor:
    """Fake quantization with one grid per row of ``dim`` (a token), computed from the live values.

    ``group``: one grid per ``group`` consecutive entries of the row instead (4-bit groups).
    ``split``: signed, with separate scales for the negative and positive parts (Shift-and-Sum's fc2
    input, after GELU): ``x >= 0`` on ``max / qmax``, ``x < 0`` on ``-min / -qmin``.
    """
    if dim not in (-1, x.dim() - 1):
        return dynamic_fake_quant(x.transpose(dim, -1), bits, symmetric, group, split).transpose(dim, -1)
    qmin, qmax = qmath.qrange(bits)
    xf = x.float()
    if group:
        xf = xf.reshape(*xf.shape[:-1], -1, group)
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    if split:
        pos = (hi.clamp(min=0) / qmax).clamp(min=1e-8)
        neg = (lo.clamp(max=0) / qmin).clamp(min=1e-8)
        out = torch.where(xf >= 0, torch.clamp(torch.round(xf / pos), 0, qmax) * pos,
                          torch.clamp(torch.round(xf / neg), qmin, 0) * neg)
    else:
        scale, zp = qmath.qparams_from_range(lo, hi, bits, symmetric)
        z = zp.float()
        out = (torch.clamp(torch.round(xf / scale) + z, qmin, qmax) - z) * scale
    return out.reshape(x.shape).to(x.dtype)


@torch.library.custom_op("arvgq::dynamic_group_fake_quant", mutates_args=())
def dynamic_group_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, group: int, split: bool, dim: int) -> torch.Tensor:
    """``dynamic_fake_quant`` as an operator (Shift-and-Sum's activations); simulation only."""
    return dynamic_fake_quant(x, bits, symmetric, group, split, dim)


@dynamic_group_fake_quant.register_fake
def _dynamic_group_fake_quant_fake(x, bits, symmetric, group, split, dim):
    return torch.empty_like(x)


DYNAMIC_GROUP_FQ = torch.ops.arvgq.dynamic_group_fake_quant.default


@torch.library.custom_op("arvgq::log2_fake_quant", mutates_args=())
def log2_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Log2 quantization of non-negative rows (attention probabilities), per row of the last axis with
    ``delta`` = the row's max: ``q = round(-log2(x / delta))``, ``x' = delta * 2^-q``, and 0 where
    ``q >= 2^bits`` (Shift-and-Sum's softmax quantizer, method.md §12.1). Simulation only."""
    xf = x.float()
    delta = xf.amax(-1, keepdim=True).clamp(min=1e-12)
    q = torch.round(-torch.log2((xf / delta).clamp(min=1e-30)))
    out = torch.where((q >= 2 ** bits) | (xf <= 0), torch.zeros_like(xf), delta * torch.exp2(-q))
    return out.to(x.dtype)


@log2_fake_quant.register_fake
def _log2_fake_quant_fake(x, bits):
    return torch.empty_like(x)


LOG2_FQ = torch.ops.arvgq.log2_fake_quant.default
