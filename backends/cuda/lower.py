"""``lower-cuda``: the fake-quant step graph onto the fused GPU ops of ``backends/cuda/ops.py``.

Runs after ``insert-qdq`` (and, in practice, after ``backends.torch_int8.fuse_attention``). Every
quantized linear site, in either form ``insert-qdq`` writes::

    linear(DQ(Q(x, s, z)), DQ(W_int8, sw), b)                                    per-tensor symmetric
    linear(DQ(Q(x * inv[g] + z[g], 1, 0)), DQ(W_int8, sw)) * s[g] - z[g]*s[g] * colsum(W) + b   STWQ, offset

becomes one ``qlinear`` call, a thin wrapper of ``ops.qgemm`` that reshapes ``[..., K]`` to rows and
back and reads ``tokens`` (T) from the activation's shape at run time. The site's tables become
buffers named after it: ``<site>.input_group_scale`` / ``_inv_scale`` / ``_zero_point`` (``[G]``,
G = 1 for a per-tensor grid), ``<site>.weight_int8`` (or ``weight_fp8``), ``<site>.weight_scale``
``[N]`` and ``<site>.weight_colsum``.

The activation's quantization moves into its producer when every user of the producer's output
is a quantizer of a lowered site (otherwise the float output stays and a standalone
``act_quant(act="none")`` quantizes it):

- LayerNorm, with an AdaLN modulate ``ln(x) * factor + shift`` (VAR, RAR; ``factor`` is
  ``1 + scale`` or, after GPS, ``kappa + scale``) -> ``ops.layernorm_quant``. The op takes
  per-image ``[B, K]`` tables: a modulation that varies over tokens (RAR's prefill) runs unfused
  at run time;
- LlamaGen/PAR's traced RMSNorm -> ``ops.rmsnorm_quant``. One with a bias (``sym-shift`` folds
  its shift there) is not fused: the op has no bias term;
- tanh-GELU between two lowered linears whose outputs feed only each other -> the first's qgemm
  epilogue (``gelu=True``, ``out_inv_scale``), which then writes the second's input codes; other
  GELUs -> ``ops.act_quant(act="gelu"|"gelu_tanh")``;
- ``silu(a) * b`` of two lowered linears on the same codes (LlamaGen/PAR's w1 and w3) that feeds one
  lowered linear -> one qgemm over both weights, rows interleaved (``<w1>.gate_up_weight_int8``...), whose
  epilogue writes the third's input codes (``swiglu=True``); other SwiGLUs -> ``act="swiglu"``;
- the residual stream's add before a norm, ``s = x + branch [* gain]`` (a per-image gain: VAR's AdaLN gammas), goes
  into the epilogue of the qgemm that makes ``branch`` when only the add reads it (``residual=``, ``gain=``);
  else into the norm's kernel (``add_layer_norm_q``, ``add_rms_norm_q``). Either way ``s`` is written once;
- no producer to fuse into, one site: the site's ``qlinear`` takes the float activation (``a_inv_scale``)
  and the qgemm quantizes it tile by tile (at most ``PROLOGUE_ROWS`` rows on CUDA; a quantize kernel runs
  first above that).

Reads of the producer's ``.shape`` do not count as users (they move to its input). Producers feeding
several sites with equal grids (LlamaGen's w1/w3) quantize once.

``format="fp8"``: the weights are the FP8 codes ``weight-quant`` gave the fake-quant graph for the FP8 grid
(``QuantConfig.weight_format``, set by ``--target cuda-fp8``). A graph quantized for int8 gets FP8 weights
re-quantized from its int8 weights (per-channel ``amax / 448``; they carry both roundings, and the stat
``weights_from_int8`` counts them). Every activation grid becomes the symmetric FP8 grid ``amax / 448`` that covers
the calibrated grid's float range per group, zero point 0.

``min_rows``: a qgemm with at most that many rows at run time (AdaLN linears, one-token decode)
dequantizes and runs a float GEMM on CUDA instead, as ``torch_int8.int8_linear`` does. Off CUDA
``ops`` runs the torch reference, so the lowered graph runs (slowly) anywhere.

Quantized attention matmuls and linears that match neither pattern keep their Q/DQ ops; the
stats say which and why. ``to_device`` moves a lowered graph to the GPU's dtype.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from backends.cuda import ops
from backends.cuda.reference import residual_sum
from core.errors import PassError, UserError
from core.qmath import fp8_codes, fp8_scale
from passes import ops as qdq
from passes.infra import Pass, PassContext, PassResult, delete_attr, get_attr, register, set_buffer

FP8_DTYPES = (torch.float8_e4m3fn,)


# ---------------------------------------------------------------------------- run-time wrappers
# The graph's call targets. They take ``[..., K]`` activations; T is ``shape[-2]``.

def _tokens(x: torch.Tensor) -> int:
    return x.shape[-2] if x.dim() >= 2 else 1


def _per_image(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """A modulation tensor as the ``[B, K]`` table the ops take, or None when it varies over x's tokens."""
    if x.dim() != 3 or t.dim() > 3 or (t.dim() >= 2 and t.shape[-2] != 1):
        return None
    return t.expand(x.shape[0], 1, x.shape[-1]).reshape(x.shape[0], x.shape[-1])


# They are ``torch.library`` custom ops (namespace ``arvgq_cuda``): opaque to torch.compile, which then
# fuses the float ops around them, safe inside CUDA graphs, and saved in graph.json as operator names.

Tensor = torch.Tensor
OptTensor = torch.Tensor | None


def _codes_like(x: Tensor, fp8: bool) -> Tensor:
    return torch.empty_like(x, dtype=torch.float8_e4m3fn if fp8 else torch.int8)


@torch.library.custom_op("arvgq_cuda::activation_q", mutates_args=())
def activation_q(x: Tensor, act: str, inv_scale: Tensor, zero: OptTensor, groups: OptTensor, qmin: int, qmax: int,
                 fp8: bool, gate: OptTensor = None) -> Tensor:
    k = x.shape[-1]
    codes = ops.act_quant(x.reshape(-1, k), act=act, inv_scale=inv_scale, zero=zero, groups=groups,
                          tokens=_tokens(x), gate=None if gate is None else gate.reshape(-1, k),
                          qmin=qmin, qmax=qmax, fp8=fp8)
    return codes.reshape(x.shape)


@activation_q.register_fake
def _(x, act, inv_scale, zero, groups, qmin, qmax, fp8, gate=None):
    return _codes_like(x, fp8)


@torch.library.custom_op("arvgq_cuda::layer_norm_q", mutates_args=())
def layer_norm_q(x: Tensor, weight: OptTensor, bias: OptTensor, eps: float, mod_scale: OptTensor, mod_shift: OptTensor,
                 inv_scale: Tensor, zero: OptTensor, groups: OptTensor, qmin: int, qmax: int, fp8: bool) -> Tensor:
    """LayerNorm, then ``* (1 + mod_scale) + mod_shift`` (each optional), then quantize."""
    k = x.shape[-1]
    scale = None if mod_scale is None else _per_image(mod_scale, x)
    shift = None if mod_shift is None else _per_image(mod_shift, x)
    if (mod_scale is not None and scale is None) or (mod_shift is not None and shift is None):
        y = F.layer_norm(x.float(), (k,), None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
        y = y if mod_scale is None else y * (1 + mod_scale.float())
        y = y if mod_shift is None else y + mod_shift.float()
        return activation_q(y, "none", inv_scale, zero, groups, qmin, qmax, fp8)
    codes = ops.layernorm_quant(x.reshape(-1, k), weight, bias, eps, inv_scale=inv_scale, zero=zero,
                                groups=groups, tokens=_tokens(x), mod_scale=scale, mod_shift=shift,
                                qmin=qmin, qmax=qmax, fp8=fp8)
    return codes.reshape(x.shape)


@layer_norm_q.register_fake
def _(x, weight, bias, eps, mod_scale, mod_shift, inv_scale, zero, groups, qmin, qmax, fp8):
    return _codes_like(x, fp8)


@torch.library.custom_op("arvgq_cuda::rms_norm_q", mutates_args=())
def rms_norm_q(x: Tensor, weight: OptTensor, eps: float, inv_scale: Tensor, zero: OptTensor, groups: OptTensor,
               qmin: int, qmax: int, fp8: bool) -> Tensor:
    k = x.shape[-1]
    codes = ops.rmsnorm_quant(x.reshape(-1, k), weight, eps, inv_scale=inv_scale, zero=zero, groups=groups,
                              tokens=_tokens(x), qmin=qmin, qmax=qmax, fp8=fp8)
    return codes.reshape(x.shape)


@rms_norm_q.register_fake
def _(x, weight, eps, inv_scale, zero, groups, qmin, qmax, fp8):
    return _codes_like(x, fp8)


# The residual stream's add before a norm, in the norm's kernel or in the epilogue of the GEMM that makes the
# branch: ``s = x + residual [* gain]`` is written once, instead of by an add kernel that the norm reads back.

def _gain_table(x: Tensor, shape, dtype: torch.dtype, gain: OptTensor) -> tuple[bool, OptTensor]:
    """``(True, per-image gain table or None)`` when ``x + r * gain`` (``r`` of ``shape`` and ``dtype``) is the add
    the kernels fuse: equal 3-d shapes, x's dtype throughout, a gain per image or none. ``(False, None)`` for
    another form (a broadcast add, a gain that varies over tokens): the op then adds unfused."""
    if gain is not None:
        dtype = torch.promote_types(dtype, gain.dtype)
    if tuple(shape) != tuple(x.shape) or x.dim() != 3 or torch.promote_types(x.dtype, dtype) != x.dtype:
        return False, None
    table = None if gain is None else _per_image(gain, x)
    return gain is None or table is not None, table


def _residual_tables(x: Tensor, residual: Tensor, gain: OptTensor):
    """``(rows of the residual, per-image gain table)`` for a norm's kernel, or None (``_gain_table``)."""
    ok, table = _gain_table(x, residual.shape, residual.dtype, gain)
    return (residual.reshape(-1, x.shape[-1]), table) if ok else None


def _unfused_sum(x: Tensor, residual: Tensor, gain: OptTensor) -> Tensor:
    return x + (residual if gain is None else residual * gain)


@torch.library.custom_op("arvgq_cuda::add_layer_norm_q", mutates_args=())
def add_layer_norm_q(x: Tensor, residual: Tensor, gain: OptTensor, weight: OptTensor, bias: OptTensor, eps: float,
                     mod_scale: OptTensor, mod_shift: OptTensor, inv_scale: Tensor, zero: OptTensor,
                     groups: OptTensor, qmin: int, qmax: int, fp8: bool) -> tuple[Tensor, Tensor]:
    """``s = x + residual [* gain]``, then ``layer_norm_q(s, ...)``: ``(s, codes)``."""
    res = _residual_tables(x, residual, gain)
    scale = None if mod_scale is None else _per_image(mod_scale, x)
    shift = None if mod_shift is None else _per_image(mod_shift, x)
    if res is None or (mod_scale is not None and scale is None) or (mod_shift is not None and shift is None):
        total = _unfused_sum(x, residual, gain)
        return total, layer_norm_q(total, weight, bias, eps, mod_scale, mod_shift, inv_scale, zero, groups, qmin,
                                   qmax, fp8)
    k = x.shape[-1]
    total, codes = ops.layernorm_quant(x.reshape(-1, k), weight, bias, eps, inv_scale=inv_scale, zero=zero,
                                       groups=groups, tokens=_tokens(x), mod_scale=scale, mod_shift=shift, qmin=qmin,
                                       qmax=qmax, fp8=fp8, residual=res[0], gain=res[1])
    return total.reshape(x.shape), codes.reshape(x.shape)


@add_layer_norm_q.register_fake
def _(x, residual, gain, weight, bias, eps, mod_scale, mod_shift, inv_scale, zero, groups, qmin, qmax, fp8):
    total = torch.empty_like(_unfused_sum(x, residual, gain))
    return total, _codes_like(total, fp8)


@torch.library.custom_op("arvgq_cuda::add_rms_norm_q", mutates_args=())
def add_rms_norm_q(x: Tensor, residual: Tensor, gain: OptTensor, weight: OptTensor, eps: float, inv_scale: Tensor,
                   zero: OptTensor, groups: OptTensor, qmin: int, qmax: int, fp8: bool) -> tuple[Tensor, Tensor]:
    """``s = x + residual [* gain]``, then ``rms_norm_q(s, ...)``: ``(s, codes)``."""
    res = _residual_tables(x, residual, gain)
    if res is None:
        total = _unfused_sum(x, residual, gain)
        return total, rms_norm_q(total, weight, eps, inv_scale, zero, groups, qmin, qmax, fp8)
    k = x.shape[-1]
    total, codes = ops.rmsnorm_quant(x.reshape(-1, k), weight, eps, inv_scale=inv_scale, zero=zero, groups=groups,
                                     tokens=_tokens(x), qmin=qmin, qmax=qmax, fp8=fp8, residual=res[0], gain=res[1])
    return total.reshape(x.shape), codes.reshape(x.shape)


@add_rms_norm_q.register_fake
def _(x, residual, gain, weight, eps, inv_scale, zero, groups, qmin, qmax, fp8):
    total = torch.empty_like(_unfused_sum(x, residual, gain))
    return total, _codes_like(total, fp8)


# A float input quantized inside the GEMM (``a_inv_scale``) at most this many rows: a launch saved at decode's
# 128 rows. Above it a quantize kernel runs first: every column block would quantize the rows again.
PROLOGUE_ROWS = 256


def gemm_input(a2: Tensor, a_inv_scale: OptTensor, a_zero: Tensor, groups: OptTensor, tokens: int, qmin: int,
               qmax: int, min_rows: int, fp8: bool) -> tuple[Tensor, OptTensor]:
    """``(rows, a_inv_scale)`` for the qgemm: float rows stay float for its prologue to quantize only where it
    will (on CUDA: more than ``min_rows``, at most ``PROLOGUE_ROWS``); elsewhere a kernel quantizes them first."""
    if a_inv_scale is not None and a2.is_cuda and not min_rows < a2.shape[0] <= PROLOGUE_ROWS:
        a2 = ops.act_quant(a2, act="none", inv_scale=a_inv_scale, zero=a_zero, groups=groups, tokens=tokens,
                           qmin=qmin, qmax=qmax, fp8=fp8)
        a_inv_scale = None
    return a2, a_inv_scale


@torch.library.custom_op("arvgq_cuda::qlinear", mutates_args=())
def qlinear(a: Tensor, w: Tensor, w_scale: Tensor, colsum: Tensor, a_scale: Tensor, a_zero: Tensor, bias: OptTensor,
            groups: OptTensor, gelu: bool = False, out_inv_scale: OptTensor = None, out_zero: OptTensor = None,
            qmin: int = -128, qmax: int = 127, min_rows: int = 0, out_dtype: torch.dtype = torch.float32,
            swiglu: bool = False, a_inv_scale: OptTensor = None, in_qmin: int = -128, in_qmax: int = 127,
            residual: OptTensor = None, gain: OptTensor = None) -> Tensor:
    """``ops.qgemm`` on the rows of ``a [..., K]`` (codes, or float with ``a_inv_scale``: its grid's quantizer
    runs in the GEMM for few rows, as a kernel of its own else); a float GEMM for few rows on CUDA. With
    ``residual``: ``residual + out [* gain]``, the residual stream's add, in the GEMM's epilogue where it has that
    form (``_gain_table``)."""
    shape = (*a.shape[:-1], w.shape[0])
    ok, table = (False, None) if residual is None else _gain_table(residual, shape, out_dtype, gain)
    if residual is not None and not (ok and residual.dtype == out_dtype):
        out = qlinear(a, w, w_scale, colsum, a_scale, a_zero, bias, groups, gelu, out_inv_scale, out_zero, qmin, qmax,
                      min_rows, out_dtype, swiglu, a_inv_scale, in_qmin, in_qmax)
        return _unfused_sum(residual, out, gain)
    k, tokens = a.shape[-1], _tokens(a)
    a2, a_inv_scale = gemm_input(a.reshape(-1, k), a_inv_scale, a_zero, groups, tokens, in_qmin, in_qmax, min_rows,
                                 w.dtype != torch.int8)
    m = a2.shape[0]
    if a2.is_cuda and m <= min_rows:
        g = (torch.zeros(m, dtype=torch.long, device=a.device) if groups is None
             else groups.long()[torch.arange(m, device=a.device) % tokens])
        x = (a2.float() - a_zero.float()[g][:, None]) * a_scale.float()[g][:, None]
        y = F.linear(x, w.float()) * w_scale.float()
        y = y if bias is None else y + bias.float()
        y = F.silu(y[:, 0::2]) * y[:, 1::2] if swiglu else y
        if out_inv_scale is not None:
            out = ops.act_quant(y, act="gelu_tanh" if gelu else "none", inv_scale=out_inv_scale,
                                zero=out_zero, groups=groups, tokens=tokens, qmin=qmin, qmax=qmax,
                                fp8=w.dtype != torch.int8)
        elif residual is not None:
            out = residual_sum(residual.reshape(m, -1), y, table, tokens).to(out_dtype)
        else:
            out = (F.gelu(y, approximate="tanh") if gelu else y).to(out_dtype)
    else:
        out = ops.qgemm(a2, w, w_scale, colsum, a_scale, a_zero, bias, groups=groups, tokens=tokens,
                        gelu=gelu, out_inv_scale=out_inv_scale, out_zero=out_zero, qmin=qmin, qmax=qmax,
                        out_dtype=out_dtype, swiglu=swiglu, a_inv_scale=a_inv_scale, in_qmin=in_qmin,
                        in_qmax=in_qmax, residual=None if residual is None else residual.reshape(m, -1),
                        gain=table)
    return out.reshape(*a.shape[:-1], -1)


@qlinear.register_fake
def _(a, w, w_scale, colsum, a_scale, a_zero, bias, groups, gelu=False, out_inv_scale=None, out_zero=None,
      qmin=-128, qmax=127, min_rows=0, out_dtype=torch.float32, swiglu=False, a_inv_scale=None, in_qmin=-128,
      in_qmax=127, residual=None, gain=None):
    dtype = w.dtype if out_inv_scale is not None else out_dtype
    out = a.new_empty((*a.shape[:-1], w.shape[0] // 2 if swiglu else w.shape[0]), dtype=dtype)
    return out if residual is None else torch.empty_like(_unfused_sum(residual, out, gain))


# the graph's call targets: the operators (plain functions would be traced into by torch.compile)
activation_q, layer_norm_q, rms_norm_q, add_layer_norm_q, add_rms_norm_q, qlinear = (
    torch.ops.arvgq_cuda.activation_q.default, torch.ops.arvgq_cuda.layer_norm_q.default,
    torch.ops.arvgq_cuda.rms_norm_q.default, torch.ops.arvgq_cuda.add_layer_norm_q.default,
    torch.ops.arvgq_cuda.add_rms_norm_q.default, torch.ops.arvgq_cuda.qlinear.default)


# ---------------------------------------------------------------------------- graph matching

def _is(node, *targets) -> bool:
    return (isinstance(node, fx.Node) and node.op in ("call_function", "call_method")
            and node.target in targets)


def _ours(node: fx.Node) -> bool:
    """Created by insert-qdq (when the pass manager recorded provenance)."""
    return node.meta.get("created_by", "insert-qdq") == "insert-qdq"


def _reads_metadata(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``...: a use that the producer's input (same shape) can serve as well."""
    return ((node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"))
            or _is(node, "size", "dim"))


def _only_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _table(node) -> tuple[str, fx.Node | None] | None:
    """A get_attr table, or its gather ``index_select(table, 0, groups).unsqueeze(-1)``: (target, groups)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node.target, None
    if _is(node, "unsqueeze") and _is(node.args[0], torch.index_select):
        table, _dim, groups = node.args[0].args
        if isinstance(table, fx.Node) and table.op == "get_attr":
            return table.target, groups
    return None


@dataclass
class _Site:
    name: str
    linear: fx.Node
    x: fx.Node            # the float activation entering the quantizer
    head: fx.Node         # the quantizer chain's first node (x's user)
    end: fx.Node          # the node whose value the qgemm takes over
    bias: object
    groups: fx.Node | None
    scale: torch.Tensor   # [G] tables of the activation grid
    inv: torch.Tensor
    zero: torch.Tensor
    qmin: int
    qmax: int
    weight: tuple[str, str]  # targets of the int8 weight and its scale
    codes: fx.Node | None = None
    out: _Site | None = None  # the site whose input this site's epilogue quantizes (GELU or SwiGLU fused)
    up: _Site | None = None   # SwiGLU's up projection, run by this (gate) site's qgemm: rows interleaved
    merged: bool = False      # this site is another's ``up``: it emits no qgemm of its own
    prologue: bool = False    # ``codes`` is the float input: the qgemm quantizes it (``qlinear``'s a_inv_scale)


def _match_site(gm: fx.GraphModule, lin: fx.Node) -> _Site | str | None:
    """The site of a quantized linear; a reason string when it cannot be lowered; None for a float linear."""
    x_dq, w_dq = lin.args[0], lin.args[1]
    if not _is(x_dq, qdq.DQ):
        return None
    site = lin.meta.get("site", lin.name)
    if not (_is(w_dq, qdq.DQ) and all(a.op == "get_attr" for a in w_dq.args[:3])):
        return "weight is not a dequantized int8 or FP8 buffer"
    w_scale = get_attr(gm, w_dq.args[1].target)
    if get_attr(gm, w_dq.args[2].target).any():
        return "asymmetric weight grid (nonzero zero point)"
    if w_scale.numel() > 1 and w_dq.args[3] != 0:
        return "weight scale is not per output channel"
    q = x_dq.args[0]
    if not (_is(q, qdq.Q) and _only_user(q) is x_dq and _only_user(x_dq) is lin):
        return "its quantizer is shared or not a Q/DQ pair"
    src, s_node, z_node, _axis, qmin, qmax = q.args
    s, z = get_attr(gm, s_node.target).float(), get_attr(gm, z_node.target).float()
    if s.numel() != 1:
        return "per-channel activation scale"
    common = {"name": site, "linear": lin, "qmin": qmin, "qmax": qmax,
              "weight": (w_dq.args[0].target, w_dq.args[1].target)}
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    grouped = (_is(src, torch.add) and _is(src.args[0], torch.mul) and _ours(src)
               and _only_user(src) is q and _only_user(src.args[0]) is src)
    if not grouped:
        return _Site(x=src, head=q, end=lin, bias=bias, groups=None, scale=s.reshape(1), inv=1 / s.reshape(1),
                     zero=z.reshape(1), **common)
    mul = src.args[0]
    x, inv, zero = mul.args[0], _table(mul.args[1]), _table(src.args[1])
    scaled = _only_user(lin)
    epilogue = _is(scaled, torch.mul) and _ours(scaled) and scaled.args[0] is lin
    scale = _table(scaled.args[1]) if epilogue else None
    if None in (inv, zero, scale) or float(s) != 1 or float(z) != 0:
        return "token-group epilogue not recognised"
    end = scaled
    nxt = _only_user(end)
    if _is(nxt, torch.sub) and _ours(nxt) and nxt.args[0] is end:  # - (z * s) * colsum
        end = nxt
        nxt = _only_user(end)
    if bias is None and _is(nxt, torch.add) and _ours(nxt) and nxt.args[0] is end:
        end, bias = nxt, nxt.args[1]
    tables = [get_attr(gm, t[0]).float().reshape(-1) for t in (scale, inv, zero)]
    return _Site(x=x, head=mul, end=end, bias=bias, groups=inv[1], scale=tables[0], inv=tables[1],
                 zero=tables[2], **common)


def _layer_norm(gm: fx.GraphModule, n) -> tuple | None:
    """(input, weight, bias, eps) of a LayerNorm over the last axis (weight/bias: node, target or None)."""
    if isinstance(n, fx.Node) and n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
            return (n.args[0], None if mod.weight is None else f"{n.target}.weight",
                    None if mod.bias is None else f"{n.target}.bias", mod.eps)
    if _is(n, F.layer_norm) and len(n.args[1]) == 1:
        args = [*n.args, None, None, None][:5]
        return (n.args[0], n.kwargs.get("weight", args[2]), n.kwargs.get("bias", args[3]),
                n.kwargs.get("eps", 1e-5 if args[4] is None else args[4]))
    return None


def _adaln(gm: fx.GraphModule, x: fx.Node) -> tuple | None:
    """``ln(h) [* factor] [+ shift]`` ending at x: (layer norm match, factor, shift)."""
    node, factor, shift = x, None, None
    if _is(node, operator.add, torch.add) and len(node.args) == 2 and all(isinstance(a, fx.Node)
                                                                           for a in node.args):
        for i in (0, 1):
            a = node.args[i]
            if len(a.users) == 1 and (_is(a, operator.mul, torch.mul) or _layer_norm(gm, a)):
                node, shift = a, node.args[1 - i]
                break
    if _is(node, operator.mul, torch.mul) and len(node.args) == 2:
        for i in (0, 1):
            a, f = node.args[i], node.args[1 - i]
            if isinstance(f, fx.Node) and len(a.users) == 1 and _layer_norm(gm, a):
                node, factor = a, f
                break
    ln = _layer_norm(gm, node)
    if ln is None or (node is not x and len(node.users) != 1):
        return None
    return ln, factor, shift


def _rms_norm(gm: fx.GraphModule, x: fx.Node) -> tuple | None:
    """LlamaGen's traced ``(xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight``, with
    the bias sym-shift may add: (h, weight node, eps, bias node or None)."""
    def with_attr(n, *targets) -> bool:
        return _is(n, *targets) and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"

    bias = None
    if with_attr(x, operator.add, torch.add):
        x, bias = x.args[0], x.args[1]
    if not with_attr(x, operator.mul, torch.mul):
        return None
    core, weight = x.args[0], x.args[1]
    if _is(core, "type_as") and len(core.users) == 1:
        core = core.args[0]
    if not (_is(core, operator.mul, torch.mul) and len(core.users) == 1):
        return None
    xf, r = core.args
    if not (_is(r, torch.rsqrt) and _is(r.args[0], operator.add) and isinstance(r.args[0].args[1], float)):
        return None
    mean = r.args[0].args[0]
    if not (_is(mean, "mean") and tuple(mean.args[1:]) == (-1,) and mean.kwargs.get("keepdim")
            and _is(mean.args[0], "pow") and tuple(mean.args[0].args) == (xf, 2)):
        return None
    h = xf.args[0] if _is(xf, "float") else xf
    return h, weight, r.args[0].args[1], bias


def _gelu(gm: fx.GraphModule, n) -> str | None:
    """``gelu`` or ``gelu_tanh`` when n is a GELU."""
    if _is(n, F.gelu):
        approx = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
    elif isinstance(n, fx.Node) and n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.GELU):
        approx = gm.get_submodule(n.target).approximate
    else:
        return None
    return "gelu_tanh" if approx == "tanh" else "gelu"


def _swiglu(n) -> tuple | None:
    """``silu(a) * b``: (a, b)."""
    if _is(n, operator.mul, torch.mul) and len(n.args) == 2:
        for i in (0, 1):
            s = n.args[i]
            if _is(s, F.silu) and len(s.users) == 1 and isinstance(n.args[1 - i], fx.Node):
                return s.args[0], n.args[1 - i]
    return None


# ---------------------------------------------------------------------------- the pass

def _fp8_grid(site: _Site) -> None:
    """The symmetric FP8 grid covering the int8 grid's float range, per group."""
    lo, hi = ((site.qmin - site.zero) * site.scale).abs(), ((site.qmax - site.zero) * site.scale).abs()
    site.scale = fp8_scale(torch.maximum(lo, hi))
    site.inv, site.zero = 1 / site.scale, torch.zeros_like(site.scale)


def _same_grid(a: _Site, b: _Site) -> bool:
    return ((a.groups is None) == (b.groups is None) and (a.qmin, a.qmax) == (b.qmin, b.qmax)
            and torch.equal(a.inv, b.inv) and torch.equal(a.zero, b.zero))


def _widen(site: _Site, groups: fx.Node, n: int) -> None:
    """A one-group grid repeated over ``n`` token groups, so that it can share another grid's groups map."""
    site.scale, site.inv, site.zero = (t.expand(n).clone() for t in (site.scale, site.inv, site.zero))
    site.groups = groups


def _mod_scale(g: fx.Graph, factor):
    """The ``scale`` of ``factor = 1 + scale`` (the ops add the 1); ``factor - 1`` for other factors (GPS's
    ``kappa + scale``)."""
    if factor is None:
        return None
    if _is(factor, operator.add, torch.add) and any(type(a) in (int, float) and a == 1 for a in factor.args):
        return next(a for a in factor.args if isinstance(a, fx.Node))
    return g.call_function(torch.sub, (factor, 1))


@dataclass
class _Lowering:
    gm: fx.GraphModule
    fp8: bool
    min_rows: int
    residual_epilogue: bool
    sites: list[_Site] = field(default_factory=list)
    replaced: dict[fx.Node, fx.Node] = field(default_factory=dict)  # a site's old output -> its qgemm
    stats: dict = field(default_factory=lambda: {
        "qgemm": 0, "standalone_quant": 0, "weights_from_int8": 0, "unfused": [],
        "fused": dict.fromkeys(("layernorm", "adaln_layernorm", "rmsnorm", "residual_add", "residual_epilogue",
                                "gelu_epilogue", "gelu",
                                "swiglu", "swiglu_epilogue", "qgemm_prologue"), 0)})

    def run(self) -> None:
        by_x: dict[fx.Node, list[_Site]] = {}
        for s in self.sites:
            by_x.setdefault(s.x, []).append(s)
        kinds = {x: self._plan(x, group) or "" for x, group in by_x.items()}  # before any emission: epilogues
        for s in self.sites:  # graph order: a site's codes exist before its qgemm
            if s.codes is None and not kinds[s.x].endswith("_epilogue"):  # else the previous qgemm writes them
                self._quantize(self.replaced.get(s.x, s.x), by_x[s.x], kinds[s.x])
            if not s.merged:
                self._qgemm(s)

    def _plan(self, x: fx.Node, group: list[_Site]) -> str | None:
        """The kind of producer that takes ``group``'s quantization, or None: a standalone quantizer."""
        heads = {s.head for s in group}
        found = self._producer(x)
        if found is None:
            return None
        kind, match = found
        reason = None
        others = [u.name for u in x.users if u not in heads and not _reads_metadata(u)]
        if others:
            reason = f"its output also feeds {', '.join(others)}"
        elif kind == "rmsnorm" and match[3] is not None:
            reason = "RMSNorm with a bias (a folded shift): rmsnorm_quant has no bias"
        if reason is not None:
            self.stats["unfused"].append({"sites": [s.name for s in group], "producer": kind,
                                          "reason": reason})
            return None
        if kind == "gelu_tanh" and len(group) == 1 and (prev := self._epilogue_host(x.args[0])) is not None:
            self._epilogue(prev, group[0])
            return "gelu_epilogue"
        if kind == "swiglu" and len(group) == 1 and (pair := self._swiglu_hosts(*match)) is not None:
            gate, up = pair
            gate.up, up.merged = up, True
            self._epilogue(gate, group[0])
            return "swiglu_epilogue"
        return kind

    def _epilogue(self, prev: _Site, site: _Site) -> None:
        """``prev``'s qgemm writes ``site``'s input codes from its epilogue."""
        if site.groups is None and prev.groups is not None:  # the qgemm has one groups map for both grids
            _widen(site, prev.groups, prev.scale.numel())
        elif prev.groups is None and site.groups is not None:
            for p in (prev, prev.up):  # up's grid stays gate's: their producer still quantizes once
                if p is not None:
                    _widen(p, site.groups, site.scale.numel())
        prev.out = site
        self.stats["fused"]["gelu_epilogue" if prev.up is None else "swiglu_epilogue"] += 1

    def _swiglu_hosts(self, gate_h, up_h) -> tuple[_Site, _Site] | None:
        """The sites whose outputs ``silu(gate_h) * up_h`` reads, when one qgemm can run both: the same input
        codes (one grid), equal shapes, each output read only by the SwiGLU."""
        gate, up = self._epilogue_host(gate_h), self._epilogue_host(up_h)
        if gate is None or up is None or gate is up or gate.x is not up.x or not _same_grid(gate, up):
            return None
        wg, wu = (get_attr(self.gm, s.weight[0]) for s in (gate, up))
        return (gate, up) if wg.shape == wu.shape else None

    def _epilogue_host(self, h) -> _Site | None:
        """The site whose output ``h`` is, when only the GELU reads it."""
        return next((s for s in self.sites if s.end is h and s.out is None and not s.merged and s.up is None
                     and len(h.users) == 1), None)

    def _producer(self, x: fx.Node) -> tuple | None:
        """(kind, match) of the op that makes ``x``, if it is one the ops can fuse a quantization into."""
        if (act := _gelu(self.gm, x)) is not None:
            return act, x.args[0]
        for kind, match in (("swiglu", _swiglu(x)), ("rmsnorm", _rms_norm(self.gm, x))):
            if match is not None:
                return kind, match
        ln = _adaln(self.gm, x)
        if ln is not None:
            return ("layernorm" if ln[1] is None and ln[2] is None else "adaln_layernorm"), ln
        return None

    def _quantize(self, x: fx.Node, group: list[_Site], kind: str) -> None:
        """Emit the codes of every site of ``group`` after ``x``: one op per distinct grid. The producer is
        matched again here: earlier qgemms replaced nodes it reads."""
        kind = kind or None
        match = None if kind is None else self._producer(x)[1]
        g = self.gm.graph
        if kind is not None:  # shape reads move to the producer's input (same shape), so that x can go
            source = match if kind.startswith("gelu") else match[0][0] if "layernorm" in kind else match[0]
            for u in [u for u in x.users if _reads_metadata(u)]:
                u.replace_input_with(x, source)
        done: list[_Site] = []
        norm_input = match[0][0] if kind in ("layernorm", "adaln_layernorm") else match[0] if kind == "rmsnorm" else None
        one_grid = all(_same_grid(group[0], s) for s in group)  # one emission: the add can move into it
        residual = self._residual(norm_input, x) if norm_input is not None and one_grid else None
        for s in group:
            same = next((d for d in done if _same_grid(d, s)), None)
            if same is not None:
                s.codes = same.codes
                continue
            with g.inserting_before(x.next):  # keeps the new nodes in order
                _scale, inv, zero = self._tables(s)
                grid = (inv, zero, s.groups, s.qmin, s.qmax, self.fp8)
                if kind is None and len(group) == 1:  # quantized in the qgemm's prologue (qlinear decides)
                    s.codes, s.prologue = x, True
                elif kind is None:
                    s.codes = g.call_function(activation_q, (x, "none", *grid))
                elif kind in ("layernorm", "adaln_layernorm"):
                    (h, weight, bias, eps), factor, shift = match
                    weight, bias = (g.get_attr(t) if isinstance(t, str) else t for t in (weight, bias))
                    mod_scale = _mod_scale(g, factor)
                    if residual is None:
                        s.codes = g.call_function(layer_norm_q, (h, weight, bias, eps, mod_scale, shift, *grid))
                    else:
                        s.codes = self._with_residual(h, residual, add_layer_norm_q, layer_norm_q,
                                                      (weight, bias, eps, mod_scale, shift, *grid))
                elif kind == "rmsnorm":
                    h, weight, eps, _bias = match
                    if residual is None:
                        s.codes = g.call_function(rms_norm_q, (h, weight, eps, *grid))
                    else:
                        s.codes = self._with_residual(h, residual, add_rms_norm_q, rms_norm_q, (weight, eps, *grid))
                elif kind == "swiglu":
                    s.codes = g.call_function(activation_q, (match[0], "swiglu", *grid), {"gate": match[1]})
                else:  # gelu, gelu_tanh
                    s.codes = g.call_function(activation_q, (match, kind, *grid))
            done.append(s)
            if s.prologue:
                self.stats["fused"]["qgemm_prologue"] += 1
            elif kind is None:
                self.stats["standalone_quant"] += 1
            else:
                self.stats["fused"]["gelu" if kind == "gelu_tanh" else kind] += 1

    def _residual(self, h: fx.Node, x: fx.Node) -> tuple | None:
        """``((stream, branch, gain or None), later readers)`` when the norm's input ``h`` is the residual
        stream's add ``stream + branch [* gain]`` whose other readers all come after the norm's output ``x`` (the
        fused op takes its place there); None otherwise."""
        if not (_is(h, operator.add, torch.add) and len(h.args) == 2 and not h.kwargs
                and all(isinstance(a, fx.Node) and a.op != "get_attr" for a in h.args)):
            return None
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        chain, todo = set(), [x]  # the nodes between h and x: they die with the norm
        while todo:
            n = todo.pop()
            if n in chain or n is h or order[n] < order[h]:
                continue
            chain.add(n)
            todo += [a for a in n.all_input_nodes]
        readers = [u for u in h.users if u not in chain]  # shape reads too: the sum has the add's shape
        if any(order[u] <= order[x] for u in readers):
            return None
        stream, branch = h.args
        for a, b in ((branch, stream), (stream, branch)):  # branch * gain, a product read only here
            if _is(b, operator.mul, torch.mul) and len(b.users) == 1 and len(b.args) == 2 and not b.kwargs and all(
                    isinstance(t, fx.Node) for t in b.args):
                return (a, b.args[0], b.args[1]), readers
        return (stream, branch, None), readers

    def _with_residual(self, h: fx.Node, residual: tuple, add_op, norm_op, args: tuple) -> fx.Node:
        """The norm over ``h``'s add: points the add's later readers at the sum ``s`` and returns the codes (emitted
        at the current insertion point). The add goes into the epilogue of the qgemm that makes its branch, when
        one does (``residual_epilogue``; then ``norm_op`` reads ``s``), else into the norm's kernel (``add_op``
        returns ``(s, codes)``)."""
        g = self.gm.graph
        (stream, branch, gain), readers = residual
        if self.residual_epilogue and self._adds_residual(branch, stream, gain):
            branch.update_kwarg("residual", stream)
            branch.update_kwarg("gain", gain)
            total, codes = branch, None
            self.stats["fused"]["residual_epilogue"] += 1
        else:
            pair = g.call_function(add_op, (stream, branch, gain, *args))
            total, codes = g.call_function(operator.getitem, (pair, 0)), g.call_function(operator.getitem, (pair, 1))
            self.stats["fused"]["residual_add"] += 1
        for u in readers:
            u.replace_input_with(h, total)
        return codes if codes is not None else g.call_function(norm_op, (total, *args))

    def _adds_residual(self, branch, stream: fx.Node, gain) -> bool:
        """Whether ``branch`` is a float-output qgemm read only by the add, emitted after ``stream`` and ``gain``."""
        if not (_is(branch, qlinear) and len(branch.users) == 1 and branch.kwargs.get("out_inv_scale") is None
                and not branch.kwargs.get("swiglu") and branch.kwargs.get("residual") is None):
            return False
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return all(order[t] < order[branch] for t in (stream, gain) if isinstance(t, fx.Node))

    def _tables(self, s: _Site) -> list[fx.Node]:
        """get_attr nodes of the site's scale, inverse scale and zero point tables (named after the site)."""
        out = []
        for suffix, t in (("scale", s.scale), ("inv_scale", s.inv), ("zero_point", s.zero)):
            set_buffer(self.gm, f"{s.name}.input_group_{suffix}", t.clone())
            out.append(self.gm.graph.get_attr(f"{s.name}.input_group_{suffix}"))
        return out

    def _weights(self, s: _Site) -> tuple[torch.Tensor, torch.Tensor]:
        """The site's GEMM weight (int8, or FP8: as calibrated, else re-quantized from int8) and its per-channel
        scale."""
        w = get_attr(self.gm, s.weight[0])
        w_scale = get_attr(self.gm, s.weight[1]).float().reshape(-1).expand(w.shape[0]).clone()
        if w.dtype in FP8_DTYPES and not self.fp8:
            raise PassError(f"lower-cuda: {s.name} has FP8 weights (quantized for --target cuda-fp8); "
                            f"lower it with format=fp8")
        if self.fp8 and w.dtype not in FP8_DTYPES:
            wf = w.float() * w_scale[:, None]
            w_scale = fp8_scale(wf.abs().amax(1))
            w = fp8_codes(wf / w_scale[:, None])
            self.stats["weights_from_int8"] += 1
        return w, w_scale

    def _qgemm(self, s: _Site) -> None:
        gm, g = self.gm, self.gm.graph
        w, w_scale = self._weights(s)
        prefix, bias = f"{s.name}.", s.bias
        if s.up is not None:  # gate and up rows interleaved: a tile's epilogue holds both halves of its units
            w_up, scale_up = self._weights(s.up)
            w, w_scale = (torch.stack(pair, 1).flatten(0, 1) for pair in ((w, w_up), (w_scale, scale_up)))
            prefix = f"{s.name}.gate_up_"
        names = [f"{prefix}weight_{'fp8' if self.fp8 else 'int8'}", f"{prefix}weight_scale",
                 f"{prefix}weight_colsum"]
        colsum = torch.zeros_like(w_scale) if self.fp8 else w.float().sum(1)  # FP8 zero points are 0
        for name, t in zip(names, (w, w_scale, colsum)):
            set_buffer(gm, name, t)
        last = s.end
        if s.up is not None:  # after both projections: up's bias may be computed after gate's GEMM
            order = {n: i for i, n in enumerate(g.nodes)}
            last = max(s.end, s.up.end, key=order.__getitem__)
        with g.inserting_before(last.next):
            scale, inv, zero = self._tables(s)
            weights = [g.get_attr(n) for n in names]
            kwargs = {"min_rows": self.min_rows, "out_dtype": torch.float32}
            if s.up is not None:
                kwargs["swiglu"] = True
                if bias is not None or s.up.bias is not None:
                    pair = [b if b is not None else g.call_function(torch.zeros_like, (other,))
                            for b, other in ((bias, s.up.bias), (s.up.bias, bias))]
                    bias = g.call_function(torch.flatten, (g.call_function(torch.stack, (pair, 1)),))
            if s.prologue:
                kwargs.update(a_inv_scale=inv, in_qmin=s.qmin, in_qmax=s.qmax)
            if s.out is not None:
                _s, out_inv, out_zero = self._tables(s.out)
                kwargs.update(gelu=s.up is None, out_inv_scale=out_inv, out_zero=out_zero, qmin=s.out.qmin,
                              qmax=s.out.qmax)
            new = g.call_function(qlinear, (s.codes, *weights, scale, zero, bias, s.groups), kwargs)
        new.meta["site"] = s.name
        self.stats["qgemm"] += 1 if s.up is None else 2
        if s.out is not None:
            s.out.codes = new
        else:
            s.end.replace_all_uses_with(new)
            self.replaced[s.end] = new


# Buffers of the fake-quant graph that a lowered site no longer reads.
_STALE = ("input_scale", "input_zero_point", "input_group_colsum", "weight_zero_point", "weight_int8", "weight_fp8",
          "weight_scale", "weight_colsum", "input_group_scale", "input_group_inv_scale", "input_group_zero_point")


@register
class LowerCuda(Pass):
    """Options: ``format`` (``int8`` or ``fp8``); ``min_rows``: qgemms of at most this many rows run as
    float GEMMs on CUDA; ``residual_epilogue``: the residual stream's add before a norm in the epilogue of the
    qgemm that makes its branch (else in the norm's kernel). Stats: ``qgemm`` sites, ``fused`` producers by
    kind, ``standalone_quant``
    quantizers, ``float_linears`` left, ``not_lowered`` sites and ``unfused`` producers with the reason."""

    name = "lower-cuda"
    format: str = "int8"
    min_rows: int = 16
    residual_epilogue: bool = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.format not in ("int8", "fp8"):
            raise UserError(f"lower-cuda: format must be int8 or fp8, got {self.format!r}")
        lowering = _Lowering(gm, self.format == "fp8", self.min_rows, self.residual_epilogue)
        not_lowered = []
        for node in list(gm.graph.nodes):
            if _is(node, F.linear):
                found = _match_site(gm, node)
                if isinstance(found, _Site):
                    lowering.sites.append(found)
                elif found is not None or "site" in node.meta:
                    not_lowered.append({"site": node.meta.get("site", node.name),
                                        "reason": found or "float linear (not quantized)"})
            elif "site" in node.meta and any(_is(a, qdq.DQ) for a in node.args):
                not_lowered.append({"site": node.meta["site"],
                                    "reason": "quantized matmul: keeps its Q/DQ ops"})
        if lowering.fp8:
            for s in lowering.sites:
                _fp8_grid(s)
        lowering.run()
        gm.graph.eliminate_dead_code()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for s in lowering.sites:
            for leaf in _STALE:
                target = f"{s.name}.{leaf}"
                if target not in used and hasattr(gm.get_submodule(s.name), leaf):
                    delete_attr(gm, target)
        gm.recompile()
        stats = {"format": self.format, **lowering.stats,
                 "float_linears": sum(_is(n, F.linear) for n in gm.graph.nodes), "not_lowered": not_lowered}
        return PassResult(gm, bool(lowering.sites), stats)


# Leaf-name suffixes of the buffers that stay float32 on the device (scales, zero points, column sums).
FLOAT32_SUFFIXES = ("_scale", "_inv_scale", "_zero_point", "_colsum")


def to_device(gm: fx.GraphModule, device: str | torch.device,
              dtype: torch.dtype = torch.float16) -> fx.GraphModule:
    """Move a lowered graph to ``device``: model tensors to ``dtype``, quantization tables float32, int8/FP8
    weights as they are, and every qgemm's output in ``dtype``. Matched by suffix, as ``torch_int8.to_device``
    (VAR's ``attn.scale_mul_1H11`` must follow the model's dtype)."""
    gm = gm.to(device)
    for name, t in list(gm.named_buffers()) + list(gm.named_parameters()):
        keep = t.dtype in FP8_DTYPES or name.rsplit(".", 1)[-1].endswith(FLOAT32_SUFFIXES)
        if t.is_floating_point() and not keep:
            t.data = t.data.to(dtype)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is qlinear:
            n.update_kwarg("out_dtype", dtype)
    gm.recompile()
    return gm
