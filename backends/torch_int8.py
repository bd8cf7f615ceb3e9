"""Run a quantized step graph with real INT8 GEMMs in PyTorch (``--target torch``).

TensorRT cannot be installed here, so the GPU evidence of INT8 speed comes from PyTorch's own
int8 GEMM, ``torch._int_mm`` (int8 x int8 -> int32, cuBLASLt on CUDA). ``lower_to_int8``
rewrites every ``linear(DQ(Q(x)), DQ(W_int8))`` of a graph made by ``insert-qdq`` into
``int8_linear(Q(x), W_int8, ...)``: the weight stays int8 (stored once, ``[N, K]`` row-major,
which is the column-major ``[K, N]`` operand cuBLASLt wants), the activation is quantized by
plain torch ops that ``torch.compile`` fuses into the producer, and scales, the zero-point
correction and the bias are applied to the int32 accumulator in one pointwise epilogue.
Token-group (STWQ) sites need nothing special: their lowering already quantizes at scale 1
and applies the per-token scale after the GEMM.

Linears with at most ``min_rows`` rows (AdaLN/condition linears, one-token decode steps)
dequantize and run in floating point: cuBLASLt's int8 path needs more than 16 rows and would
be slower there anyway. Off CUDA everything runs that way (fake quantization).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from passes import ops
from passes.infra import Pass, PassContext, PassResult, get_attr, register, set_buffer

MIN_ROWS = 16
INT_MM_ON_CPU = False  # tests set this: torch._int_mm also runs (slowly) on CPU


def quantize_inline(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor Q in plain torch ops, so torch.compile can fuse it (our custom op is opaque to it)."""
    return torch.clamp(torch.round(x.float() / scale) + zero_point.float(), qmin, qmax).to(torch.int8)


def dequantize_inline(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    if scale.dim() > 1 and scale.dim() == q.dim():  # group-wise weights (--bits W4A4): blocked along axis
        scale = scale.repeat_interleave(q.shape[axis] // scale.shape[axis], dim=axis)
        zero_point = zero_point.repeat_interleave(q.shape[axis] // zero_point.shape[axis], dim=axis)
    elif scale.numel() > 1:
        shape = [1] * q.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (q.float() - zero_point.float()) * scale


def int8_linear(q: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor,
                x_zero_point: torch.Tensor, w_colsum: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype, min_rows: int) -> torch.Tensor:
    """``linear((q - zx) * sx, w_int8 * sw, bias)`` with an int8 GEMM when it pays off.

    ``(q - zx) @ W^T = q @ W^T - zx * colsum(W)``: the zero point costs one rank-1 correction.
    """
    k = q.shape[-1]
    q2 = q.reshape(-1, k)
    if (q2.is_cuda or INT_MM_ON_CPU) and q2.shape[0] > min_rows:
        acc = torch._int_mm(q2, w_int8.t()).float()
        y = (acc - x_zero_point.float() * w_colsum) * (x_scale * w_scale)
    else:
        x = (q2.float() - x_zero_point.float()) * x_scale
        y = F.linear(x, w_int8.float() * w_scale[:, None])
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*q.shape[:-1], -1)


def _per_tensor_q(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is ops.Q and node.args[1].op == "get_attr"


_EPILOGUE = (torch.mul, torch.sub, torch.add)


def _cast_after_epilogue(g: fx.Graph, node: fx.Node, dtype: torch.dtype) -> None:
    """Cast a token-group epilogue (``* s - z*s*colsum + b`` with float32 tables) back to ``dtype``.

    Without it the float32 per-token scales promote everything downstream (attention, norms)
    to float32: measured on an H100, attention then ran in fp32 GEMMs at twice the time.
    """
    last = node
    while len(last.users) == 1 and next(iter(last.users)).target in _EPILOGUE:
        last = next(iter(last.users))
    if last is node:
        return
    users = list(last.users)
    with g.inserting_after(last):
        cast = g.call_method("to", (last, dtype))
    for u in users:
        u.replace_input_with(last, cast)


def lower_to_int8(gm: fx.GraphModule, *, dtype: torch.dtype = torch.float16, min_rows: int = MIN_ROWS) -> tuple[fx.GraphModule, dict]:
    """Rewrite a fake-quant graph into one with int8 GEMMs; returns the graph and counts."""
    g = gm.graph
    counts = {"int8_linears": 0, "float_linears": 0}
    for node in list(g.nodes):
        if not (node.op == "call_function" and node.target is F.linear):
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if not (x.op == "call_function" and x.target is ops.DQ and _per_tensor_q(x.args[0])
                and w.op == "call_function" and w.target is ops.DQ and w.args[0].op == "get_attr"
                and int(get_attr(gm, x.args[1].target).numel()) == 1
                and get_attr(gm, w.args[1].target).dim() <= 1):  # not group-wise weights: one scale per row
            counts["float_linears"] += 1
            continue
        q = x.args[0]
        w_int8 = get_attr(gm, w.args[0].target)
        site = node.meta.get("site", node.name)
        set_buffer(gm, f"{site}.weight_colsum", w_int8.float().sum(1))
        with g.inserting_before(node):
            colsum = g.get_attr(f"{site}.weight_colsum")
            new = g.call_function(int8_linear, (q, w.args[0], w.args[1], x.args[1], x.args[2], colsum, bias, dtype, min_rows))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        _cast_after_epilogue(g, new, dtype)
        counts["int8_linears"] += 1
    for node in list(g.nodes):  # the remaining custom ops become plain torch for the compiler
        if node.op == "call_function" and node.target is ops.Q:
            x, s, z, _axis, qmin, qmax = node.args
            node.target, node.args = quantize_inline, (x, s, z, qmin, qmax)
        elif node.op == "call_function" and node.target is ops.DQ:
            node.target = dequantize_inline
    g.eliminate_dead_code()
    gm.recompile()
    return gm, counts


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _call(node, *targets) -> bool:
    """A call_function/call_method node of one of ``targets`` (functions, or method names)."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _softmax_last_dim(node) -> bool:
    if not _call(node, "softmax", F.softmax, torch.softmax):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim == -1 and node.kwargs.get("dtype") is None


def _is_key_transpose(node) -> bool:
    return _call(node, "transpose") and tuple(node.args[1:]) in ((-2, -1), (-1, -2))


def fuse_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """Replace ``softmax(q @ k^T [* c] [+ mask]) @ v`` by ``F.scaled_dot_product_attention``.

    Only attention whose matmuls stay in floating point (the default: their inputs are not
    dequantized) is fused. The traced step spells attention out as matmuls so that they can be
    sites; a deployed FP16/INT8 step should run it as one fused kernel, as the official models
    do (VAR, LlamaGen and RAR call SDPA). Measured on an H100 at VAR-d16 size, the explicit form
    spent 22 of 59 ms per step in the two batched matmuls and the softmax.
    """
    g = gm.graph
    fused = 0
    for out in list(g.nodes):
        if not (_call(out, torch.matmul, operator.matmul) and _softmax_last_dim(out.args[0]) and _single_user(out.args[0])):
            continue
        probs, v = out.args
        scores, mask, scale = probs.args[0], None, 1.0
        if _call(scores, operator.add) and _single_user(scores):
            scores, mask = scores.args
        if (_call(scores, operator.mul) and _single_user(scores)
                and isinstance(scores.args[1], (int, float))):
            scores, scale = scores.args[0], float(scores.args[1])
        if not (_call(scores, torch.matmul, operator.matmul) and _single_user(scores) and _is_key_transpose(scores.args[1])):
            continue
        q, kt = scores.args
        k = kt.args[0]
        if any(isinstance(t, fx.Node) and t.target is ops.DQ for t in (q, k, v)):
            continue  # quantized attention: keep the matmuls and their Q/DQ
        with g.inserting_before(out):
            new = g.call_function(F.scaled_dot_product_attention, (q, k, v),
                                  {"attn_mask": mask, "scale": scale})
        new.meta.update({key: val for key, val in out.meta.items() if key != "site"})
        out.replace_all_uses_with(new)
        g.erase_node(out)
        fused += 1
    g.eliminate_dead_code()
    gm.recompile()
    return gm, fused


# Leaf names of the buffers the passes create (``blocks.0.fc1.input_scale``): they stay float32.
QUANT_BUFFER_SUFFIXES = ("_scale", "_inv_scale", "_zero_point", "_colsum")


def to_device(gm: fx.GraphModule, device: str | torch.device, dtype: torch.dtype = torch.float16) -> fx.GraphModule:
    """Move to ``device``; the model's floating tensors go to ``dtype``, quantization scales stay float32.

    Matched by suffix, not substring: VAR's own ``attn.scale_mul_1H11`` must become fp16, or it
    promotes q, and with it the whole attention, to float32 (measured on an H100: attention
    GEMMs ran as fp32 kernels, 27 ms of a 96 ms step).
    """
    gm = gm.to(device)
    for name, t in list(gm.named_buffers()) + list(gm.named_parameters()):
        if t.is_floating_point() and not name.rsplit(".", 1)[-1].endswith(QUANT_BUFFER_SUFFIXES):
            t.data = t.data.to(dtype)
    return gm


@register
class FuseAttention(Pass):
    """``fuse-attention``: floating-point attention as one SDPA call (see ``fuse_attention``).

    Equal up to float rounding; after ``insert-qdq`` a rounding difference can move a value across a
    downstream quantizer's boundary, so the manager records its SQNR instead of requiring equality.
    """

    name = "fuse-attention"

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        gm, fused = fuse_attention(gm)
        return PassResult(gm, fused > 0, {"fused": fused})


@register
class LowerInt8Torch(Pass):
    """``lower-int8-torch``: the fake-quant linears as ``torch._int_mm`` GEMMs (see ``lower_to_int8``).

    ``dtype``: float16 for CUDA (the deployed step), float32 to check it on the CPU.
    """

    name = "lower-int8-torch"
    dtype: str = "float16"
    min_rows: int = MIN_ROWS

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        gm, counts = lower_to_int8(gm, dtype=getattr(torch, self.dtype), min_rows=self.min_rows)
        return PassResult(gm, counts["int8_linears"] > 0, counts)
