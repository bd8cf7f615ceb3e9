"""Plain-torch definitions of the GPU backend's fused kernels: the contract they are tested against.

Every kernel of ``backends/cuda/kernels.py`` computes exactly what its function here computes
(int32 accumulation bit-exact, the float epilogue to float tolerance). The lowering pass
(``backends/cuda/lower.py``) calls the dispatching functions of ``backends/cuda/ops.py``, which run the
Triton kernel on a GPU (or under ``TRITON_INTERPRET=1``) and these functions elsewhere.

Conventions shared by every function:

- Activations are 2-d ``[M, K]``: the rows of a ``[B, T, K]`` tensor, row ``m`` is token ``m % T``
  of image row ``m // T``. ``tokens`` is ``T``.
- Static token-group (STWQ) grids are tables indexed by group: ``scale[G]``, ``inv_scale[G]``
  (= 1 / scale, precomputed exactly as ``insert-qdq`` does), ``zero[G]`` (float holding integers).
  ``groups`` is the int32/int64 ``[T]`` map token -> group; ``None`` means one group (per-tensor
  grid: every table has one element).
- Quantizing is ``clamp(round_half_even(y * inv_scale[g] + zero[g]), qmin, qmax)`` to int8: the
  same arithmetic as the fake-quant graph (multiply by the inverse, then add the zero point).
- FP8 (E4M3) codes: ``(y * inv_scale[g]).clamp(-448, 448).to(torch.float8_e4m3fn)``, zero point 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.qmath import fp8_codes


def row_groups(m: int, tokens: int, groups: torch.Tensor | None, device) -> torch.Tensor:
    """The group of every row: ``groups[m % tokens]`` (zeros without groups)."""
    if groups is None:
        return torch.zeros(m, dtype=torch.long, device=device)
    return groups.long()[torch.arange(m, device=device) % tokens]


def quantize_codes(y: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, g: torch.Tensor,
                   qmin: int, qmax: int, fp8: bool = False) -> torch.Tensor:
    """Rows of ``y`` [M, K] onto their group's grid: int8 codes, or float8_e4m3fn codes when ``fp8``."""
    y = y.float() * inv_scale.float()[g][:, None]
    if fp8:
        return fp8_codes(y)
    return torch.clamp(torch.round(y + zero.float()[g][:, None]), qmin, qmax).to(torch.int8)


def qgemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor,
          a_scale: torch.Tensor, a_zero: torch.Tensor, bias: torch.Tensor | None = None, *,
          groups: torch.Tensor | None = None, tokens: int = 1, gelu: bool = False,
          out_inv_scale: torch.Tensor | None = None, out_zero: torch.Tensor | None = None,
          qmin: int = -128, qmax: int = 127, out_dtype: torch.dtype = torch.float16, swiglu: bool = False,
          a_inv_scale: torch.Tensor | None = None, in_qmin: int = -128, in_qmax: int = 127,
          qkv: tuple | None = None, residual: torch.Tensor | None = None,
          gain: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized linear with the whole STWQ lowering in its epilogue.

    ``a`` int8 [M, K] codes (or float8_e4m3fn), ``w`` int8 [N, K] (or float8_e4m3fn), ``w_scale`` f32 [N],
    ``colsum`` f32 [N] = sum over k of ``w`` (integers as float; unused when every zero is 0)::

        a         = quantize_codes(a, a_inv_scale, a_zero, g, in_qmin, in_qmax)   if a_inv_scale is given
                                                                     (a is float: its grid's quantizer, fused)
        acc[m, n] = sum_k a[m, k] * w[n, k]                          (int32, or f32 for fp8)
        y[m, n]   = (acc - a_zero[g] * colsum[n]) * a_scale[g] * w_scale[n] + bias[n]
        y         = gelu_tanh(y)                                     if gelu
        y[m, j]   = silu(y[m, 2j]) * y[m, 2j + 1]                    if swiglu (w's rows: gate and up interleaved;
                                                                     N / 2 columns out)
        out       = quantize_codes(y, out_inv_scale, out_zero, g)    if out_inv_scale is given (next GEMM's input)
                  = qkv_heads(y, tokens, *qkv)                       if qkv is given (an attention's projection)
                  = (residual + y * gain[image]).to(out_dtype)       if residual [M, N] is given (the residual
                                                                     stream's add, in float32; gain [B, N] optional)
                  = y.to(out_dtype)                                  otherwise
    """
    g = row_groups(a.shape[0], tokens, groups, a.device)
    if a_inv_scale is not None:
        a = quantize_codes(a, a_inv_scale, a_zero, g, in_qmin, in_qmax, fp8=w.dtype != torch.int8)
    # float64 holds every int8 x int8 sum exactly (|sum| < 2^53), and runs on CUDA too (int64 matmul does not)
    acc = a.double() @ w.double().t() if a.dtype == torch.int8 else a.float().double() @ w.float().double().t()
    y = (acc - a_zero.double()[g][:, None] * colsum.double()[None, :]) * a_scale.double()[g][:, None] * w_scale.double()[None, :]
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    if swiglu:
        y = F.silu(y[:, 0::2]) * y[:, 1::2]
    if qkv is not None:
        return qkv_heads(y, tokens, *qkv)
    if out_inv_scale is not None:
        return quantize_codes(y, out_inv_scale, out_zero, g, qmin, qmax, fp8=a.dtype != torch.int8)
    if residual is not None:
        y = residual_sum(residual, y, gain, tokens)
    return y.to(out_dtype)


def qkv_heads(y: torch.Tensor, tokens: int, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
              gain: torch.Tensor | None, head_dim: int, normalize: bool, eps: float) -> torch.Tensor:
    """An attention's projection ``y [M, 3C]`` (rows: T tokens of each image; columns: q, k, v, each H heads of
    ``head_dim``) written where attention reads it: k and v into ``[B, H, L, D]`` caches at positions ``index``
    (``index_copy_`` along L), q returned as ``[M, C]`` rows in the caches' dtype. ``normalize``: q and k
    L2-normalized per head (``F.normalize(x, dim=-1, eps=eps)``); ``gain [H]``: q's per-head factor."""
    m, c = y.shape[0], y.shape[1] // 3
    q, k, v = y.float().view(m // tokens, tokens, 3, c // head_dim, head_dim).unbind(2)  # [B, T, H, D]
    if normalize:
        q, k = F.normalize(q, dim=-1, eps=eps), F.normalize(k, dim=-1, eps=eps)
    if gain is not None:
        q = q * gain.float().view(1, 1, -1, 1)
    k_cache.index_copy_(2, index, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, index, v.transpose(1, 2).to(v_cache.dtype))
    return q.reshape(m, c).to(k_cache.dtype)


def _modulate(y: torch.Tensor, tokens: int, mod_scale, mod_shift) -> torch.Tensor:
    """AdaLN modulate ``y * (1 + scale[b]) + shift[b]`` with per-image ``[B, K]`` tables (row m: image m // T)."""
    if mod_scale is None and mod_shift is None:
        return y
    b = torch.arange(y.shape[0], device=y.device) // tokens
    if mod_scale is not None:
        y = y * (1 + mod_scale.float()[b])
    if mod_shift is not None:
        y = y + mod_shift.float()[b]
    return y


def residual_sum(x: torch.Tensor, residual: torch.Tensor | None, gain: torch.Tensor | None, tokens: int):
    """``x + residual * gain[image]`` in float32 (the residual stream's add before a norm), or ``x``."""
    xf = x.float()
    if residual is None:
        return xf
    r = residual.float()
    if gain is not None:
        r = r * gain.float()[torch.arange(x.shape[0], device=x.device) // tokens]
    return xf + r


def layernorm_quant(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                    inv_scale: torch.Tensor, zero: torch.Tensor, groups: torch.Tensor | None = None, tokens: int = 1,
                    mod_scale: torch.Tensor | None = None, mod_shift: torch.Tensor | None = None,
                    qmin: int = -128, qmax: int = 127, fp8: bool = False, residual: torch.Tensor | None = None,
                    gain: torch.Tensor | None = None):
    """LayerNorm (optional affine), then AdaLN modulate (optional), then quantize, in one pass over ``x`` [M, K].

    With ``residual [M, K]`` (and optionally a per-image ``gain [B, K]``) the norm's input is the residual
    stream's sum ``s = x + residual * gain``, computed in float32: returns ``(s in x's dtype, codes)``."""
    s = residual_sum(x, residual, gain, tokens)
    y = F.layer_norm(s, x.shape[-1:], None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    y = _modulate(y, tokens, mod_scale, mod_shift)
    codes = quantize_codes(y, inv_scale, zero, row_groups(x.shape[0], tokens, groups, x.device), qmin, qmax, fp8)
    return codes if residual is None else (s.to(x.dtype), codes)


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, inv_scale: torch.Tensor,
                  zero: torch.Tensor, groups: torch.Tensor | None = None, tokens: int = 1,
                  qmin: int = -128, qmax: int = 127, fp8: bool = False, residual: torch.Tensor | None = None,
                  gain: torch.Tensor | None = None):
    """RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight`` (LlamaGen/PAR), then quantize; ``residual``/``gain`` as
    ``layernorm_quant``."""
    xf = residual_sum(x, residual, gain, tokens)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    codes = quantize_codes(y, inv_scale, zero, row_groups(x.shape[0], tokens, groups, x.device), qmin, qmax, fp8)
    return codes if residual is None else (xf.to(x.dtype), codes)


def act_quant(x: torch.Tensor, *, act: str, inv_scale: torch.Tensor, zero: torch.Tensor,
              groups: torch.Tensor | None = None, tokens: int = 1, gate: torch.Tensor | None = None,
              qmin: int = -128, qmax: int = 127, fp8: bool = False) -> torch.Tensor:
    """An activation, then quantize: ``act`` is ``none``, ``gelu`` (erf), ``gelu_tanh``, or ``swiglu``
    (``silu(x) * gate``, LlamaGen/PAR's FFN)."""
    y = x.float()
    if act == "gelu":
        y = F.gelu(y)
    elif act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif act == "swiglu":
        y = F.silu(y) * gate.float()
    elif act != "none":
        raise ValueError(f"unknown activation {act!r}")
    return quantize_codes(y, inv_scale, zero, row_groups(x.shape[0], tokens, groups, x.device), qmin, qmax, fp8)


def kv_write(cache: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
    """``cache[:, :, index[t]] = value[:, :, t]`` in place: the rows of this step's keys or values written into
    a ``[B, H, L, D]`` cache (``value [B, H, T, D]``, any strides)."""
    cache.index_copy_(2, index, value.to(cache.dtype))


# The int8 KV cache: each cached row (one token of one head) is written once and read by every later step, so
# it carries its own scale, set when it is written: ``amax(|row|) / 127``, symmetric, codes in [-127, 127].
KV_QMAX = 127.0


def kv_quantize(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[..., D]`` as int8 codes and their float32 scales ``[...]`` (a zero row: codes 0, scale 0)."""
    v = value.float()
    amax = v.abs().amax(-1)
    inv = torch.where(amax > 0, KV_QMAX / amax, torch.zeros_like(amax))
    codes = torch.clamp(torch.round(v * inv[..., None]), -KV_QMAX, KV_QMAX).to(torch.int8)
    return codes, amax / KV_QMAX


def kv_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float()[..., None]).to(dtype)


def kv_write_int8(cache: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
    """``kv_write`` into an int8 cache ``[B, H, L, D]`` and its scales ``[B, H, L]``: row ``t`` of ``value`` as
    ``kv_quantize`` writes it, at ``index[t]``."""
    codes, s = kv_quantize(value)
    cache.index_copy_(2, index, codes)
    scale.index_copy_(2, index, s)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, n_keys: int,
              scale: float, *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
              out_inv_scale: torch.Tensor | None = None, out_zero: torch.Tensor | None = None,
              groups: torch.Tensor | None = None, qmin: int = -128, qmax: int = 127, fp8: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` of ``q [B, H, T, D]`` over the first ``n_keys`` rows of the caches
    ``k``, ``v [B, H, L, D]``, with the additive ``mask`` (over those keys) if given, computed in float32.
    Caches in ``q``'s dtype, or int8 codes with a scale per row (``k_scale``, ``v_scale [B, H, L]``: dequantized
    to ``q``'s dtype first). Returns ``[B, T, H, D]`` (the layout the output projection reads as ``[B, T, C]``):
    in ``q``'s dtype, or with ``out_inv_scale`` the codes of the output projection's input grid
    (``quantize_codes`` of each row ``b, t`` with token ``t``'s group)."""
    def cached(x, s):
        x = x[..., :n_keys, :]
        return (x if s is None else kv_dequantize(x, s[..., :n_keys], q.dtype)).float()

    m = None if mask is None else mask[..., :n_keys].float()
    y = F.scaled_dot_product_attention(q.float(), cached(k, k_scale), cached(v, v_scale), attn_mask=m, scale=scale)
    y = y.transpose(1, 2).contiguous()  # [B, T, H, D]
    if out_inv_scale is None:
        return y.to(q.dtype)
    B, T, H, D = y.shape
    codes = quantize_codes(y.reshape(B * T, H * D), out_inv_scale, out_zero, row_groups(B * T, T, groups, y.device),
                           qmin, qmax, fp8)
    return codes.view(B, T, H, D)
