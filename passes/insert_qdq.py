"""``insert-qdq``: materialise every quantization decision as Q/DQ nodes.

For a linear site ``s`` with decisions ``s.input`` and ``s.weight``::

    x -> Q(x, s.input_scale, s.input_zero_point) -> DQ -> F.linear(., DQ(s.weight_int8, ...), bias)

Weights are stored once, as int8 buffers with per-channel scales (the float weight is
removed), so the exported ONNX carries int8 initializers and a DequantizeLinear. Scales are
buffers named after the site, so ONNX initializers and reports carry the user's module path.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from passes import ops
from passes.canonicalize import is_linear
from passes.diagnostics import PassError
from passes.infra import Pass, PassContext, PassResult, delete_attr, get_attr, register, set_buffer
from passes.qmath import QParams
from passes.quantize import quantized_weight


def _qdq(g: fx.Graph, value: fx.Node, gm, prefix: str, qp: QParams) -> fx.Node:
    set_buffer(gm, f"{prefix}_scale", qp.scale.float().clone())
    set_buffer(gm, f"{prefix}_zero_point", qp.zero_point.to(torch.int8).clone())
    scale, zp = g.get_attr(f"{prefix}_scale"), g.get_attr(f"{prefix}_zero_point")
    base = prefix.replace(".", "_")
    q = g.create_node("call_function", ops.Q, (value, scale, zp, qp.axis, qp.qmin, qp.qmax), name=f"{base}_q")
    return g.create_node("call_function", ops.DQ, (q, scale, zp, qp.axis), name=f"{base}_dq")


@register
class InsertQDQ(Pass):
    name = "insert-qdq"

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        g = gm.graph
        counts = {"activations": 0, "weights": 0}
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
                    if qp.granularity == "group":
                        raise PassError(f"{site}.{role}: per-group scales need the stwq lowering, which this pipeline lacks")
                    args[i] = _qdq(g, args[i], gm, f"{site}.{role}", qp)
                    counts["activations"] += 1
                wqp = ctx.qparams.get(f"{site}.weight")
                if is_linear(node) and wqp is not None:
                    w_node = args[1]
                    w = get_attr(gm, w_node.target)
                    set_buffer(gm, f"{site}.weight_int8", quantized_weight(w, wqp))
                    set_buffer(gm, f"{site}.weight_scale", wqp.scale.float().clone())
                    set_buffer(gm, f"{site}.weight_zero_point", wqp.zero_point.clone())
                    args[1] = g.create_node("call_function", ops.DQ, (
                        g.get_attr(f"{site}.weight_int8"), g.get_attr(f"{site}.weight_scale"),
                        g.get_attr(f"{site}.weight_zero_point"), wqp.axis), name=f"{site.replace('.', '_')}_weight_dq")
                    counts["weights"] += 1
                    if len(w_node.users) == 1:  # only this linear used the float weight
                        node.args = tuple(args)
                        g.erase_node(w_node)
                        delete_attr(gm, w_node.target)
            node.args = tuple(args)
        gm.recompile()
        return PassResult(gm, any(counts.values()), counts)
