"""``insert-qdq``: materialise every quantization decision as Q/DQ nodes.

For a linear site ``s`` with decisions ``s.input`` and ``s.weight``::

    x -> Q(x, s.input_scale, s.input_zero_point) -> DQ -> F.linear(., DQ(s.weight_int8, ...), bias)

Token-group scales (STWQ), and asymmetric per-tensor linear inputs (with scalar s, z and no
gather), are lowered the way TensorRT can run them (DESIGN.md): a gather
of the group's scale, a pointwise rescale, a per-tensor Q/DQ with scale 1 and zero point 0,
the int8 GEMM, and the scale (and the zero point's exact correction) applied to its output::

    s = S[token_groups][:, None]; z = Z[token_groups][:, None]
    v = DQ(Q(x / s + z, 1, 0))                       # the integer grid, clamped to b bits
    y = F.linear(v, W) * s - (z * s) * colsum(W) + bias   # == F.linear((v - z) * s, W, bias)

Weights are stored once, as int8 buffers with per-channel scales (the float weight is
removed), so the exported ONNX carries int8 initializers and a DequantizeLinear; an FP8 weight grid
(``--target cuda-fp8``) stores ``s.weight_fp8`` (float8_e4m3fn) instead. Scales are
buffers named after the site, so ONNX initializers and reports carry the user's module path.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from core.errors import PassError
from core.qmath import QParams
from passes import ops
from passes.canonicalize import is_linear
from passes.infra import Pass, PassContext, PassResult, delete_attr, get_attr, register, set_buffer
from passes.position_groups import positions_node
from passes.quantize import quantized_weight


def _qdq(g: fx.Graph, value: fx.Node, gm, prefix: str, qp: QParams) -> fx.Node:
    set_buffer(gm, f"{prefix}_scale", qp.scale.float().clone())
    set_buffer(gm, f"{prefix}_zero_point", qp.zero_point.to(torch.int8).clone())
    scale, zp = g.get_attr(f"{prefix}_scale"), g.get_attr(f"{prefix}_zero_point")
    base = prefix.replace(".", "_")
    q = g.create_node("call_function", ops.Q, (value, scale, zp, qp.axis, qp.qmin, qp.qmax), name=f"{base}_q")
    return g.create_node("call_function", ops.DQ, (q, scale, zp, qp.axis), name=f"{base}_dq")


def _token_groups(gm) -> fx.Node:
    """The model's token_groups input, else the constant positions STWQ derived groups from."""
    for n in gm.graph.nodes:
        if n.op == "placeholder" and "token_groups" in n.name:
            return n
    positions = positions_node(gm)
    if positions is not None:
        return positions
    raise PassError("token-group scales need a graph input named token_groups")


def _offset_qdq(g: fx.Graph, x: fx.Node, gm, site: str, qp: QParams, groups: fx.Node | None):
    """x -> v = DQ(Q(x / s + z)) at scale 1, zero point 0; returns v and (s, z) for the epilogue.

    With ``groups`` s and z are gathered per token from the group tables; without, they are
    the per-tensor scalars (an asymmetric grid that TensorRT could not take as a zero point).
    """
    base = f"{site}.input"
    name = base.replace(".", "_")
    set_buffer(gm, f"{base}_group_scale", qp.scale.float().clone())
    set_buffer(gm, f"{base}_group_inv_scale", (1.0 / qp.scale.float()).clone())
    set_buffer(gm, f"{base}_group_zero_point", qp.zero_point.float().clone())
    set_buffer(gm, f"{base}_scale", torch.tensor(1.0))
    set_buffer(gm, f"{base}_zero_point", torch.tensor(0, dtype=torch.int8))

    def gather(table: str, suffix: str) -> fx.Node:
        if groups is None:
            return g.get_attr(f"{base}_{table}")  # 0-d: broadcasts everywhere
        picked = g.create_node("call_function", torch.index_select, (g.get_attr(f"{base}_{table}"), 0, groups),
                               name=f"{name}_{suffix}")
        return g.call_method("unsqueeze", (picked, -1))  # [T] -> [T, 1]: broadcasts over [..., T, C]

    s, inv, z = gather("group_scale", "s"), gather("group_inv_scale", "inv_s"), gather("group_zero_point", "z")
    xs = g.call_function(torch.add, (g.call_function(torch.mul, (x, inv)), z))
    one, zero = g.get_attr(f"{base}_scale"), g.get_attr(f"{base}_zero_point")
    q = g.create_node("call_function", ops.Q, (xs, one, zero, 0, qp.qmin, qp.qmax), name=f"{name}_q")
    v = g.create_node("call_function", ops.DQ, (q, one, zero, 0), name=f"{name}_dq")
    return v, (s, z, qp.symmetric)


def _apply_group_epilogue(g: fx.Graph, gm, node: fx.Node, site: str, post) -> None:
    """Rewrite ``y = linear(v, W, b)`` into ``linear(v, W) * s - (z * s) * colsum(W) + b``."""
    s, z, symmetric = post
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    node.args = (node.args[0], node.args[1], None)
    users = [u for u in node.users]
    with g.inserting_after(node):
        y = g.call_function(torch.mul, (node, s))
    last = y
    if not symmetric:
        w = node.args[1]
        weight = _materialize(gm, w)
        set_buffer(gm, f"{site}.input_group_colsum", weight.sum(1).float())
        with g.inserting_after(last):
            zs = g.call_function(torch.mul, (z, s))
        with g.inserting_after(zs):
            colsum = g.get_attr(f"{site}.input_group_colsum")
        with g.inserting_after(colsum):
            corr = g.call_function(torch.mul, (zs, colsum))
        with g.inserting_after(corr):
            last = g.call_function(torch.sub, (last, corr))
    if bias is not None:
        with g.inserting_after(last):
            last = g.call_function(torch.add, (last, bias))
    for u in users:
        u.replace_input_with(node, last)


def _materialize(gm, w: fx.Node) -> torch.Tensor:
    """The float weight a linear multiplies by (dequantized if it is int8)."""
    if w.op == "get_attr":
        return get_attr(gm, w.target).detach().float()
    if w.op == "call_function" and w.target is ops.DQ:
        q, s, z, axis = w.args
        return ops.dequantize(get_attr(gm, q.target), get_attr(gm, s.target), get_attr(gm, z.target), axis)
    raise PassError(f"cannot evaluate the weight {w.name} of a token-group linear")


@register
class InsertQDQ(Pass):
    name = "insert-qdq"

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        g = gm.graph
        counts = {"activations": 0, "weights": 0}
        post = None
        for node in list(g.nodes):
            site = node.meta.get("site")
            if site is None or node.op != "call_function":
                continue
            args = list(node.args)
            roles = ("input",) if is_linear(node) else ("a", "b")
            with g.inserting_before(node):
                for i, role in enumerate(roles):
                    qp = ctx.qparams.get(f"{site}.{role}")
                    if qp is None:
                        continue
                    offset = is_linear(node) and qp.granularity == "tensor" and not qp.symmetric
                    if qp.granularity == "group" or offset:
                        if not is_linear(node):
                            raise PassError(f"{site}.{role}: token-group scales are only lowered for linears")
                        groups = _token_groups(gm) if qp.granularity == "group" else None
                        args[0], post = _offset_qdq(g, args[0], gm, site, qp, groups)
                    else:
                        args[i] = _qdq(g, args[i], gm, f"{site}.{role}", qp)
                    counts["activations"] += 1
                wqp = ctx.qparams.get(f"{site}.weight")
                if is_linear(node) and wqp is not None:
                    w_node = args[1]
                    w = get_attr(gm, w_node.target)
                    codes = f"{site}.weight_{'fp8' if wqp.fp8 else 'int8'}"
                    set_buffer(gm, codes, quantized_weight(w, wqp))
                    set_buffer(gm, f"{site}.weight_scale", wqp.scale.float().clone())
                    set_buffer(gm, f"{site}.weight_zero_point", wqp.zero_point.clone())
                    args[1] = g.create_node("call_function", ops.DQ, (
                        g.get_attr(codes), g.get_attr(f"{site}.weight_scale"),
                        g.get_attr(f"{site}.weight_zero_point"), wqp.axis), name=f"{site.replace('.', '_')}_weight_dq")
                    counts["weights"] += 1
                    if len(w_node.users) == 1:  # only this linear used the float weight
                        node.args = tuple(args)
                        g.erase_node(w_node)
                        delete_attr(gm, w_node.target)
            node.args = tuple(args)
            if post is not None:
                _apply_group_epilogue(g, gm, node, site, post)
                post = None
        gm.recompile()
        return PassResult(gm, any(counts.values()), counts)
