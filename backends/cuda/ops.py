"""The fused GPU ops the lowered step graph calls: Triton kernels on CUDA, the torch reference elsewhere.

Signatures are those of ``backends/cuda/reference.py``. Activations are 2-d ``[M, K]``: callers flatten
``[B, T, K]`` to ``[B*T, K]`` (and pass ``tokens=T``). The Triton kernels run when the input is on CUDA, or
under ``TRITON_INTERPRET=1`` (CPU tensors through Triton's interpreter; set it before ``triton`` is imported);
otherwise the reference runs. Bad input raises ``ValueError``.
"""
from __future__ import annotations

import os

import torch

from backends.cuda import reference

_CODES = (torch.int8, torch.float8_e4m3fn)


def _impl(x: torch.Tensor):
    """The kernels module when the Triton path applies, else the reference (kernels imported lazily:
    CPU-only runs never import triton)."""
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from backends.cuda import kernels
        return kernels
    return reference


def runs_kernels(x: torch.Tensor) -> bool:
    """Whether the ops run Triton kernels for ``x`` (else the torch reference)."""
    return _impl(x) is not reference


def _c(t):
    return None if t is None else t.contiguous()


def _rows(t):
    """A per-image table ``[B, K]`` as the kernels take it: any row stride, contiguous columns (AdaLN's chunks are
    strided views; copying them was a kernel launch each, six a VAR block)."""
    return None if t is None else t if t.stride(1) == 1 else t.contiguous()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_rows(x, name, groups, tokens):
    _check(x.dim() == 2, f"{name} must be 2-d [M, K] (flatten [B, T, K] first), got shape {tuple(x.shape)}")
    _check(tokens >= 1, f"tokens must be >= 1, got {tokens}")
    _check(groups is None or groups.numel() >= tokens,
           f"groups maps {0 if groups is None else groups.numel()} tokens, fewer than tokens={tokens}")


def _check_vec(t, name, n):
    if t is not None:
        _check(t.numel() == n, f"{name} must have {n} elements, got shape {tuple(t.shape)}")


def qgemm(a, w, w_scale, colsum, a_scale, a_zero, bias=None, *, groups=None, tokens=1, gelu=False,
          out_inv_scale=None, out_zero=None, qmin=-128, qmax=127, out_dtype=torch.float16, swiglu=False,
          a_inv_scale=None, in_qmin=-128, in_qmax=127, qkv=None, residual=None, gain=None):
    """``qkv = (k_cache, v_cache, index, gain or None, head_dim, normalize, eps)``: ``reference.qkv_heads`` as
    the epilogue (returns q). ``residual [M, N]`` (and a per-image ``gain [B, N]``): the residual stream's add
    ``residual + y * gain`` as the epilogue of a float output."""
    _check_rows(a, "a", groups, tokens)
    _check(w.dim() == 2 and w.dtype in _CODES, f"w must be 2-d [N, K] int8 or float8_e4m3fn, got "
           f"{tuple(w.shape)} {w.dtype}")
    if a_inv_scale is None:
        _check(a.dtype == w.dtype, f"a must be {w.dtype} codes as w (or float with a_inv_scale), got {a.dtype}")
    else:
        _check(a.is_floating_point() and a.dtype not in _CODES, f"a must be float with a_inv_scale, got {a.dtype}")
        _check_vec(a_inv_scale, "a_inv_scale", a_scale.numel())
    _check(a.shape[1] == w.shape[1], f"K mismatch: a is {tuple(a.shape)}, w is {tuple(w.shape)}")
    for name, t in (("w_scale", w_scale), ("colsum", colsum), ("bias", bias)):
        _check_vec(t, name, w.shape[0])
    _check_vec(a_zero, "a_zero", a_scale.numel())
    _check(out_inv_scale is None or out_zero is not None or w.dtype != torch.int8,
           "out_zero is required with out_inv_scale for int8 output")
    _check(not swiglu or (w.shape[0] % 2 == 0 and not gelu),
           f"swiglu needs gate and up rows in pairs (even N, got {w.shape[0]}) and no gelu")
    if qkv is not None:
        k_cache, v_cache, index, head_gain, head_dim, _normalize, _eps = qkv
        c = w.shape[0] // 3
        _check(not (gelu or swiglu or out_inv_scale is not None), "qkv takes the projection's float output only")
        _check(w.shape[0] % 3 == 0 and k_cache.dim() == 4 and k_cache.shape[1] * head_dim == c
               and k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
               and k_cache.shape[0] * tokens == a.shape[0] and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride(),
               f"qkv: caches must be equal [B, H, L, {head_dim}] with B * tokens = M and H * {head_dim} = N / 3, got "
               f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)} for a {tuple(a.shape)} x {tuple(w.shape)} GEMM")
        _check(index.dim() == 1 and index.numel() == tokens and not index.is_floating_point(),
               f"qkv: index must be [T={tokens}] integers, got {tuple(index.shape)} {index.dtype}")
        _check_vec(head_gain, "gain", c // head_dim)
        qkv = (k_cache, v_cache, index.contiguous(), _c(head_gain), head_dim, _normalize, _eps)
    if residual is not None:
        _check(not (gelu or swiglu or out_inv_scale is not None or qkv is not None),
               "residual takes the projection's float output only (no gelu, swiglu, out_inv_scale or qkv)")
        _check(residual.shape == (a.shape[0], w.shape[0]) and residual.dtype == out_dtype,
               f"residual must be [M, N] = {(a.shape[0], w.shape[0])} {out_dtype}, got {tuple(residual.shape)} "
               f"{residual.dtype}")
    _check(gain is None or residual is not None, "gain goes with a residual")
    _check_table(gain, "gain", residual, tokens)
    return _impl(a).qgemm(_c(a), _c(w), _c(w_scale), _c(colsum), _c(a_scale), _c(a_zero), _c(bias),
                          groups=_c(groups), tokens=tokens, gelu=gelu, out_inv_scale=_c(out_inv_scale),
                          out_zero=_c(out_zero), qmin=qmin, qmax=qmax, out_dtype=out_dtype, swiglu=swiglu,
                          a_inv_scale=_c(a_inv_scale), in_qmin=in_qmin, in_qmax=in_qmax, qkv=qkv,
                          residual=_c(residual), gain=_rows(gain))


def _check_quant(x, zero, groups, tokens, fp8):
    _check_rows(x, "x", groups, tokens)
    _check(x.is_floating_point(), f"x must be floating point, got {x.dtype}")
    _check(zero is not None or fp8, "zero is required for int8 codes")


def _check_table(t, name, x, tokens):
    _check(t is None or (t.dim() == 2 and t.shape[1] == x.shape[1] and t.shape[0] * tokens >= x.shape[0]),
           f"{name} must be [B, K] with B * tokens >= M, got {None if t is None else tuple(t.shape)}")


def _check_residual(x, residual, gain, tokens):
    _check(residual is None or residual.shape == x.shape,
           f"residual must match x {tuple(x.shape)}, got {None if residual is None else tuple(residual.shape)}")
    _check(gain is None or residual is not None, "gain goes with a residual")
    _check_table(gain, "gain", x, tokens)


def layernorm_quant(x, weight, bias, eps, *, inv_scale, zero, groups=None, tokens=1, mod_scale=None,
                    mod_shift=None, qmin=-128, qmax=127, fp8=False, residual=None, gain=None):
    _check_quant(x, zero, groups, tokens, fp8)
    _check_vec(weight, "weight", x.shape[1])
    _check_vec(bias, "bias", x.shape[1])
    _check_table(mod_scale, "mod_scale", x, tokens)
    _check_table(mod_shift, "mod_shift", x, tokens)
    _check_residual(x, residual, gain, tokens)
    return _impl(x).layernorm_quant(_c(x), _c(weight), _c(bias), eps, inv_scale=_c(inv_scale), zero=_c(zero),
                                    groups=_c(groups), tokens=tokens, mod_scale=_rows(mod_scale),
                                    mod_shift=_rows(mod_shift), qmin=qmin, qmax=qmax, fp8=fp8, residual=_c(residual),
                                    gain=_rows(gain))


def rmsnorm_quant(x, weight, eps, *, inv_scale, zero, groups=None, tokens=1, qmin=-128, qmax=127, fp8=False,
                  residual=None, gain=None):
    _check_quant(x, zero, groups, tokens, fp8)
    _check_vec(weight, "weight", x.shape[1])
    _check_residual(x, residual, gain, tokens)
    return _impl(x).rmsnorm_quant(_c(x), _c(weight), eps, inv_scale=_c(inv_scale), zero=_c(zero),
                                  groups=_c(groups), tokens=tokens, qmin=qmin, qmax=qmax, fp8=fp8,
                                  residual=_c(residual), gain=_rows(gain))


def act_quant(x, *, act, inv_scale, zero, groups=None, tokens=1, gate=None, qmin=-128, qmax=127, fp8=False):
    _check_quant(x, zero, groups, tokens, fp8)
    _check(act in ("none", "gelu", "gelu_tanh", "swiglu"), f"unknown activation {act!r}")
    _check((gate is not None) == (act == "swiglu"), f"gate goes with swiglu and only with it (act={act!r})")
    _check(gate is None or gate.shape == x.shape, f"gate must match x {tuple(x.shape)}")
    return _impl(x).act_quant(_c(x), act=act, inv_scale=_c(inv_scale), zero=_c(zero), groups=_c(groups),
                              tokens=tokens, gate=_c(gate), qmin=qmin, qmax=qmax, fp8=fp8)


def kv_write(cache, index, value) -> None:
    _check(cache.dim() == 4 and value.dim() == 4 and value.shape[:2] == cache.shape[:2]
           and value.shape[3] == cache.shape[3],
           f"cache must be [B, H, L, D] and value [B, H, T, D], got {tuple(cache.shape)} and {tuple(value.shape)}")
    _check(index.dim() == 1 and index.numel() == value.shape[2] and not index.is_floating_point(),
           f"index must be [T] integers, got {tuple(index.shape)} {index.dtype}")
    _check(cache.stride(3) == 1, "the cache's last dimension must be contiguous")
    _impl(cache).kv_write(cache, index.contiguous(), value)


def _check_int8_cache(cache, scale, name):
    _check(cache.dim() == 4 and cache.dtype == torch.int8 and cache.stride(3) == 1,
           f"{name} must be an int8 [B, H, L, D] cache with its last dimension contiguous, got "
           f"{tuple(cache.shape)} {cache.dtype}")
    _check(scale.shape == cache.shape[:3] and scale.dtype == torch.float32 and scale.stride(2) == 1,
           f"{name}'s scales must be float32 {tuple(cache.shape[:3])} with L contiguous, got "
           f"{tuple(scale.shape)} {scale.dtype}")


def kv_write_int8(cache, scale, index, value) -> None:
    _check_int8_cache(cache, scale, "cache")
    _check(value.dim() == 4 and value.shape[:2] == cache.shape[:2] and value.shape[3] == cache.shape[3],
           f"value must be [B, H, T, D] as the cache {tuple(cache.shape)}, got {tuple(value.shape)}")
    _check(index.dim() == 1 and index.numel() == value.shape[2] and not index.is_floating_point(),
           f"index must be [T] integers, got {tuple(index.shape)} {index.dtype}")
    _impl(cache).kv_write_int8(cache, scale, index.contiguous(), value)


def attention(q, k, v, mask, n_keys, scale, *, k_scale=None, v_scale=None, out_inv_scale=None, out_zero=None,
              groups=None, qmin=-128, qmax=127, fp8=False):
    _check(q.dim() == 4 and q.is_floating_point(), f"q must be floating [B, H, T, D], got {tuple(q.shape)} {q.dtype}")
    _check((k_scale is None) == (v_scale is None), "k_scale and v_scale go together (int8 caches)")
    if k_scale is None:
        for name, c in (("k", k), ("v", v)):
            _check(c.dim() == 4 and c.dtype == q.dtype and c.stride(3) == 1,
                   f"{name} must be a [B, H, L, D] cache in q's dtype {q.dtype} with its last dimension contiguous, "
                   f"got {tuple(c.shape)} {c.dtype}")
    else:
        _check_int8_cache(k, k_scale, "k")
        _check_int8_cache(v, v_scale, "v")
    _check(k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3] and v.shape[:3] == k.shape[:3],
           f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    _check(1 <= n_keys <= k.shape[2], f"n_keys must be in [1, {k.shape[2]}], got {n_keys}")
    _check(mask is None or mask.shape[-1] >= n_keys, f"the mask covers {mask.shape[-1] if mask is not None else 0} "
           f"keys, fewer than {n_keys}")
    if out_inv_scale is not None:
        _check(out_zero is not None or fp8, "out_zero is required for int8 codes")
        _check(groups is None or groups.numel() >= q.shape[2],
               f"groups maps {0 if groups is None else groups.numel()} tokens, fewer than the {q.shape[2]} queries")
    if mask is not None:  # broadcast to [B, H, T, n] as strides (zero where broadcast)
        mask = mask[..., :n_keys].expand(*q.shape[:3], n_keys)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _impl(q).attention(q, k, v, mask, n_keys, scale, k_scale=k_scale, v_scale=v_scale,
                              out_inv_scale=_c(out_inv_scale), out_zero=_c(out_zero), groups=_c(groups), qmin=qmin,
                              qmax=qmax, fp8=fp8)
