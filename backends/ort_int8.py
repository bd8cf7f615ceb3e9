"""onnxruntime-specific int8 variant of an exported Q/DQ graph.

Our default export is TensorRT-shaped: int8 (s8) activations, ``Q -> DQ -> MatMul <- DQ(W)``,
float GEMM outputs. onnxruntime's CPU QDQ fusions leave that graph in float on x86 without
VNNI (it only fuses s8 activations where u8s8 cannot overflow), so here every quantized GEMM
is rewritten into the contrib op onnxruntime runs on its int8 kernels::

    Q(x, s, z) -> DQ -> MatMul(., DQ(W_int8, w_s)) [-> Add(bias)]
      ==>  Q(x, s, z + 128 as uint8) -> MatMulIntegerToFloat(q, W_int8, s, w_s, z + 128, bias)

The uint8 code is the int8 code plus 128 (both clamp to 256 levels), and the GEMM accumulates
in int32, so the result equals the fake-quant graph up to float32 rounding.

A token-group (STWQ) linear is exported as ``x * inv_s[g] + z[g] -> Q(1, 0) -> DQ -> MatMul ->
* s[g] [- (z s)[g] colsum] [+ bias]`` (``passes/insert_qdq.py``), five to eight pointwise passes
over the activations. Here it becomes::

    QuantizeLinear(x, s[g], z[g] + 128, axis=-2) -> MatMulIntegerToFloat(., W, a_scale=s[g][:, None])
        [-> Add(C[g])],   C = bias - (z s) colsum  (or the plain bias when every z is 0)

``s[g]``, ``z[g]`` and ``C[g]`` are Gathers of small per-group tables by ``token_groups``.
MatMulIntegerToFloat takes a per-row ``[T, 1]`` ``a_scale`` (it multiplies its output by it)
but only a scalar ``a_zero_point``, so the GEMM runs with zero point 128 and the per-row zero
point comes back exactly through ``C``; with a per-row ``a_scale`` it scales its ``bias`` input
too, so the bias stays in the one ``Add``. A grid narrower than 8 bits (a ``Clip`` before the
Q) keeps the exported input side and folds only the output side.

That per-row form costs two passes over the GEMM's output (onnxruntime's single-threaded ``a_scale``
pass and the ``Add``). When every token of a call is in one group ``g`` (each VAR step feeds one
scale, each decode step one token), an ``If`` on the group index takes the other branch::

    MatMulIntegerToFloat(., W, a_scale=s[g], bias=C[g])

a scalar ``a_scale`` and a ``[N]`` bias, which onnxruntime applies inside the GEMM's own output pass;
the same numbers.

torch's tanh GELU, exported as eight pointwise nodes, becomes onnxruntime's ``FastGelu`` (one pass, the same
formula).

The KV-cache writes (``index_copy`` along the position axis) export as ``Transpose ->
ScatterND -> Transpose``, two more copies of the whole cache per write; they become one
``ScatterND`` on the cache's own layout.

The linears the recipes keep in float because they see one row per image (VAR's AdaLN linears:
``default_exclude``, exported as ``Gemm`` on a 2-d input) are matrix-vector products bound by
reading their weights (17 x 1024 x 6144 floats per VAR-d16 step). They become
``DynamicQuantizeMatMul``: int8 weights (symmetric per output channel, 7 bits where u8 x s8 could
saturate), the rows quantized per call to uint8 (per tensor, as onnxruntime's ``quantize_dynamic``
does). Only the linears the caller names (``row_gemms``: module-path globs matched on the weight's name,
the family's ``default_exclude`` for the targets) are rewritten: a linear a user excluded stays float.
This is the one approximation the lowering adds to the Q/DQ graph. Everything else (norms, attention)
stays as exported (the fused GELU differs from the exported one by float rounding only).

x86 without VNNI computes u8 x s8 with ``vpmaddubsw``, which saturates a pair of products in
int16 unless |w| <= 64 (7-bit weights, ``weight-quant{reduce_range=true}``). A weight, or an
int8 activation used as the B operand, that may exceed that range on such a CPU is shifted to
uint8 as well (zero point 128): onnxruntime then uses its u8u8 kernel, exact but slower.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.io import atomic_path

MS_DOMAIN = "com.microsoft"


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _reads(node) -> list[str]:
    """Every name ``node`` reads: its inputs and, for control flow (``If``), the outer names its branches use."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
            inner = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
            names += [i for n in g.node for i in _reads(n) if i not in inner]
    return names


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in _reads(n):
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self._names = {n.name for n in self.g.node} | set(self.inits) | set(self.producer)
        self.uniform: dict[str, tuple[str, str]] = {}  # token-group index -> (all equal, first group); see _uniform_groups

    def const(self, name: str):
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def append(self, node) -> str:
        """Append ``node``, keeping the producer / consumer maps current; returns its first output."""
        self.g.node.append(node)
        for o in node.output:
            self.producer[o] = node
        for i in _reads(node):
            self.consumers.setdefault(i, []).append(node)
        return node.output[0]

    def add_init(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        t = numpy_helper.from_array(array, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name


def _scalar_qparams(gr: _Graph, node) -> tuple[str, np.ndarray] | None:
    """(scale name, int8 zero point) of a Q/DQ with a constant per-tensor grid, else None."""
    scale = gr.const(node.input[1])
    zp = gr.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1 or zp.dtype != np.int8:
        return None
    return node.input[1], zp.reshape(())


def _gathered(gr: _Graph, name: str) -> tuple[np.ndarray, str] | None:
    """(table, index input) when ``name`` is ``Unsqueeze(Gather(table, index), [-1])`` of a constant 1-d
    table: a token-group quantity of ``insert-qdq``, ``[T, 1]``."""
    n = gr.producer.get(name)
    if n is None or n.op_type != "Unsqueeze":
        return None
    axes = gr.const(n.input[1]) if len(n.input) > 1 else np.array(_attr(n, "axes", []))
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, 1):
        return None
    gather = gr.producer.get(n.input[0])
    if gather is None or gather.op_type != "Gather" or _attr(gather, "axis", 0) != 0:
        return None
    table = gr.const(gather.input[0])
    if table is None or table.ndim != 1 or table.dtype != np.float32:
        return None
    return table, gather.input[1]


def _other(node, name: str) -> str:
    """The input of binary ``node`` that is not ``name``."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _only_consumer(gr: _Graph, name: str, op_type: str):
    users = gr.consumers.get(name, [])
    if name in gr.outputs or len(users) != 1 or users[0].op_type != op_type:
        return None
    return users[0]


def _group_epilogue(gr: _Graph, mm, n_out: int) -> dict | None:
    """The token-group epilogue after MatMul ``mm`` (``* s[g]``, ``- (z s)[g] colsum``, ``+ bias``) as
    tables, else None: ``scale [G]``, ``groups`` (the index input), ``offset [G, N]`` (bias minus the
    zero-point correction; None without a correction), ``bias`` (the bias initializer when there is
    no correction, else None) and ``out`` (the tensor the epilogue ends in)."""
    mul = _only_consumer(gr, mm.output[0], "Mul")
    g = _gathered(gr, _other(mul, mm.output[0])) if mul is not None else None
    if g is None:
        return None
    scale, groups = g
    offset, bias, last = np.zeros((scale.size, n_out), np.float32), None, mul
    corrected = False
    sub = _only_consumer(gr, last.output[0], "Sub")
    if sub is not None and sub.input[0] == last.output[0]:
        corr = gr.producer.get(sub.input[1])
        if corr is None or corr.op_type != "Mul":
            return None
        colsum = next((gr.const(i) for i in corr.input if gr.const(i) is not None), None)
        zs = gr.producer.get(next((i for i in corr.input if gr.const(i) is None), ""))
        if colsum is None or colsum.shape != (n_out,) or zs is None or zs.op_type != "Mul":
            return None
        z, s = (_gathered(gr, i) for i in zs.input)
        if z is None or s is None or z[1] != groups or s[1] != groups or z[0].size != scale.size:
            return None
        offset -= (z[0] * s[0])[:, None].astype(np.float32) * colsum[None, :].astype(np.float32)
        last, corrected = sub, True
    add = _only_consumer(gr, last.output[0], "Add")
    if add is not None:
        b = gr.const(_other(add, last.output[0]))
        if b is not None and b.dtype == np.float32 and b.shape == (n_out,):
            offset += b[None, :]
            bias, last = _other(add, last.output[0]), add
    return {"scale": scale, "groups": groups, "out": last.output[0], "bias": None if corrected else bias,
            "offset": offset if corrected else None}


def _group_quantize(gr: _Graph, q, scale: np.ndarray, groups: str) -> tuple[str, np.ndarray] | None:
    """(x, zero points [G]) when int8 Q ``q`` (scale 1, zero point 0, full 8 bits) quantizes
    ``x * inv_s[g] + z[g]`` with ``inv_s = 1 / scale`` gathered by ``groups``: the token-group grid
    ``insert-qdq`` lowers for TensorRT, which one per-row QuantizeLinear computes directly."""
    qp = _scalar_qparams(gr, q)
    if qp is None or float(gr.const(qp[0])) != 1.0 or int(qp[1]) != 0:
        return None
    add = gr.producer.get(q.input[0])
    if add is None or add.op_type != "Add":
        return None
    for mul_out in add.input:
        mul, z = gr.producer.get(mul_out), _gathered(gr, _other(add, mul_out))
        if mul is None or mul.op_type != "Mul" or z is None or z[1] != groups:
            continue
        for x in mul.input:
            inv = _gathered(gr, _other(mul, x))
            if (inv is not None and inv[1] == groups and inv[0].shape == scale.shape
                    and np.allclose(inv[0] * scale, 1.0, rtol=1e-6) and np.array_equal(z[0], np.round(z[0]))
                    and z[0].min() >= -128 and z[0].max() <= 127):
                return x, z[0]
    return None


def lower_for_ort(model: onnx.ModelProto, *, u8s8_safe: bool, row_gemms: Sequence[str] = ("*",)) -> dict:
    """Rewrite every quantized MatMul of ``model`` (in place) into MatMulIntegerToFloat, with the
    token-group epilogues folded and the KV-cache writes' transposes removed (see the module doc);
    the float one-row linears whose module path matches a glob of ``row_gemms`` become dynamically
    quantized int8 GEMMs.

    ``u8s8_safe``: the CPU has VNNI, so u8 x s8 cannot saturate whatever the weights (see the
    module doc). Returns counts: ``int8_gemms`` (u8 x s8), ``u8u8_gemms`` (B shifted to uint8
    because it could saturate), ``float_matmuls`` (MatMuls left in float), ``group_epilogues``
    (token-group epilogues folded into the GEMM's ``a_scale``), ``group_quantizers`` (token-group
    input grids as one per-row QuantizeLinear), ``cache_writes`` (Transpose/ScatterND/Transpose
    triples made one ScatterND), ``row_gemms`` (float one-row linears made DynamicQuantizeMatMul), ``gelus``
    (tanh GELUs made FastGelu)."""
    gr = _Graph(model)
    row_gemms = _quantize_row_gemms(gr, u8s8_safe, row_gemms) if row_gemms else 0
    u8_of: dict[str, tuple[str, str, str]] = {}  # int8 Q output -> (uint8 twin, scale, uint8 zero point)
    counts = {"int8_gemms": 0, "u8u8_gemms": 0, "float_matmuls": 0, "group_epilogues": 0, "group_quantizers": 0,
              "cache_writes": _fold_cache_writes(gr), "row_gemms": row_gemms, "gelus": _fuse_tanh_gelu(gr)}
    replaced: list = []
    grouped_u8: dict[str, str] = {}  # int8 Q output -> its per-row uint8 QuantizeLinear

    def group_quantize(q, scale: np.ndarray, groups: str) -> str | None:
        if q.output[0] not in grouped_u8:
            found = _group_quantize(gr, q, scale, groups)
            if found is None:
                return None
            x, z = found
            s_vec = _gather(gr, gr.add_init(f"{q.output[0]}_row_scale", scale.astype(np.float32)), groups)
            zp_vec = _gather(gr, gr.add_init(f"{q.output[0]}_row_zero_point_u8", (z + 128).astype(np.uint8)), groups)
            out = gr.fresh(f"{q.output[0]}_u8")
            gr.append(helper.make_node("QuantizeLinear", [x, s_vec, zp_vec], [out], axis=-2,
                                       name=gr.fresh(f"{q.name or q.output[0]}_rows_u8")))
            grouped_u8[q.output[0]] = out
            counts["group_quantizers"] += 1
        return grouped_u8[q.output[0]]

    def u8_quantize(q) -> tuple[str, str, str] | None:
        """(uint8 output, scale, uint8 zero point) of the twin of int8 Q node ``q``."""
        qp = _scalar_qparams(gr, q)
        if qp is None:
            return None
        scale, zp = qp
        if q.output[0] not in u8_of:
            zp_name = gr.add_init(f"{q.input[1].removesuffix('_scale')}_zero_point_u8", np.array(int(zp) + 128, np.uint8))
            out = gr.fresh(f"{q.output[0]}_u8")
            gr.append(helper.make_node("QuantizeLinear", [q.input[0], scale, zp_name], [out],
                                       name=gr.fresh(f"{q.name or q.output[0]}_u8")))
            u8_of[q.output[0]] = (out, scale, zp_name)
        return u8_of[q.output[0]]

    for mm in [n for n in gr.g.node if n.op_type == "MatMul"]:
        dq_a, dq_b = gr.producer.get(mm.input[0]), gr.producer.get(mm.input[1])
        if not (dq_a is not None and dq_b is not None and dq_a.op_type == dq_b.op_type == "DequantizeLinear"):
            counts["float_matmuls"] += 1
            continue
        q_a = gr.producer.get(dq_a.input[0])
        a = u8_quantize(q_a) if q_a is not None and q_a.op_type == "QuantizeLinear" and _scalar_qparams(gr, dq_a) else None
        b = _b_operand(gr, dq_b, u8s8_safe, u8_quantize)
        if a is None or b is None:
            counts["float_matmuls"] += 1
            continue
        b_name, b_scale, b_zp, shifted = b
        out, bias = mm.output[0], ""
        w = gr.const(b_name)
        n_out = w.shape[-1] if w is not None else None
        epi = _group_epilogue(gr, mm, n_out) if n_out is not None and float(gr.const(a[1])) == 1.0 else None
        if epi is not None:
            a_in = group_quantize(q_a, epi["scale"], epi["groups"]) or a[0]
            replaced.append(gr.producer[epi["out"]])  # its output is produced anew below; the chain before it dies
            scale = gr.add_init(f"{mm.output[0]}_row_scale", epi["scale"].reshape(-1, 1).astype(np.float32))
            offset = gr.add_init(f"{mm.output[0]}_row_offset", epi["offset"]) if epi["offset"] is not None else None
            same, first = _uniform_groups(gr, epi["groups"])
            branches = []
            for index in (first, epi["groups"]):  # If(one group): scalar scale, offset as the bias; else per row
                nodes = [_gather_node(gr, scale, index)]
                c = epi["bias"] or ""
                if offset is not None:
                    nodes.append(_gather_node(gr, offset, index))
                    c = nodes[-1].output[0]
                if index == first:  # [1] a_scale and [N] bias fuse into the GEMM's output pass
                    gemm_in, add = [a_in, b_name, nodes[0].output[0], b_scale, a[2], b_zp, c], None
                else:  # a [T, 1] a_scale is one more pass, which would scale the bias too: the offset is one Add
                    gemm_in, add = [a_in, b_name, nodes[0].output[0], b_scale, a[2], b_zp], c
                while gemm_in[-1] == "":
                    gemm_in.pop()
                out = gr.fresh(f"{epi['out']}_{'one_group' if index == first else 'rows'}")
                gemm_out = gr.fresh(f"{out}_scaled") if add else out
                nodes.append(helper.make_node("MatMulIntegerToFloat", gemm_in, [gemm_out], domain=MS_DOMAIN,
                                              name=gr.fresh(f"{mm.name or mm.output[0]}_int8")))
                if add:
                    nodes.append(helper.make_node("Add", [gemm_out, add], [out], name=gr.fresh(f"{mm.name}_offset")))
                branches.append(helper.make_graph(nodes, gr.fresh(f"{mm.name}_branch"), [],
                                                  [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)]))
            gr.append(helper.make_node("If", [same], [epi["out"]], then_branch=branches[0], else_branch=branches[1],
                                       name=gr.fresh(f"{mm.name or mm.output[0]}_groups")))
            replaced.append(mm)
            counts["group_epilogues"] += 1
            counts["u8u8_gemms" if shifted else "int8_gemms"] += 1
            continue
        add = gr.consumers.get(out, [])
        if out not in gr.outputs and len(add) == 1 and add[0].op_type == "Add":
            other = _other(add[0], out)
            c = gr.const(other)
            if c is not None and c.ndim == 1 and c.dtype == np.float32 and c.shape[0] == n_out:
                bias, out = other, add[0].output[0]
                replaced.append(add[0])
        inputs = [a[0], b_name, a[1], b_scale, a[2], b_zp, bias]
        while inputs[-1] == "":
            inputs.pop()
        gr.append(helper.make_node("MatMulIntegerToFloat", inputs, [out], domain=MS_DOMAIN,
                                   name=gr.fresh(f"{mm.name or mm.output[0]}_int8")))
        replaced.append(mm)
        counts["u8u8_gemms" if shifted else "int8_gemms"] += 1
    for n in replaced:
        gr.g.node.remove(n)
    _prune(model)
    _toposort(model)  # the new nodes were appended at the end
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _quantize_row_gemms(gr: _Graph, u8s8_safe: bool, patterns: Sequence[str]) -> int:
    """Every float ``Gemm(x, W, bias)`` with a constant weight, the exporter's linear on a 2-d input (one
    row per image: VAR's AdaLN linears, which the recipes keep float), becomes onnxruntime's
    ``DynamicQuantizeMatMul(x, W_int8, w_scale, bias)``: the weight symmetric per output channel
    (7 bits where u8 x s8 could saturate), the rows quantized per call (uint8, per tensor). Such a GEMM
    is a matrix-vector product bound by reading its weight, which int8 makes 4x smaller. Only those whose
    module path (the weight's name less ``.weight``) matches a glob of ``patterns``. Returns the number
    rewritten."""
    import torch

    from core.qmath import qparams_from_range, qrange, quantize

    done = 0
    for n in [n for n in gr.g.node if n.op_type == "Gemm"]:
        w = gr.const(n.input[1])
        bias = gr.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        base = n.input[1].removesuffix(".weight")
        if (not any(fnmatch.fnmatchcase(base, p) for p in patterns) or w is None or w.dtype != np.float32 or w.ndim != 2 or _attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0
                or (bias is not None and (bias.dtype != np.float32 or bias.shape != (w.shape[0 if _attr(n, "transB", 0) else 1],)
                                          or _attr(n, "beta", 1.0) != 1.0))):
            continue
        wt = torch.from_numpy(w.T.copy() if _attr(n, "transB", 0) else w)  # [K, N]
        bits = 8 if u8s8_safe else 7
        scale, zp = qparams_from_range(wt.amin(0), wt.amax(0), bits, symmetric=True)
        w_int8 = quantize(wt, scale, zp, 1, *qrange(bits)).numpy()
        inputs = [n.input[0], gr.add_init(f"{base}.weight_int8", w_int8), gr.add_init(f"{base}.weight_scale", scale.numpy()),
                  "", n.input[2] if bias is not None else ""]
        while inputs[-1] == "":
            inputs.pop()
        gr.g.node.remove(n)
        for i in n.input:
            gr.consumers[i].remove(n)
        gr.append(helper.make_node("DynamicQuantizeMatMul", inputs, list(n.output), domain=MS_DOMAIN,
                                   name=gr.fresh(f"{n.name or n.output[0]}_dynamic_int8")))
        done += 1
    return done


def _operand_of(gr: _Graph, node, op_type: str, value: float) -> str | None:
    """The other input of binary ``node`` (of ``op_type``) when one input is the scalar constant ``value``."""
    if node is None or node.op_type != op_type or len(node.input) != 2:
        return None
    for i in (0, 1):
        c = gr.const(node.input[i])
        if c is not None and c.size == 1 and np.isclose(float(c.reshape(())), value, rtol=1e-6, atol=0):
            return node.input[1 - i]
    return None


def _fuse_tanh_gelu(gr: _Graph) -> int:
    """torch's tanh GELU as exported, ``x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))))`` (eight passes
    over the activation: Pow, Mul, Add, Mul, Tanh, Add, Mul, Mul), becomes onnxruntime's ``FastGelu(x)``: the same
    formula in one pass. Returns the number fused."""
    def sole(name: str, node) -> bool:  # an intermediate only the chain reads
        return name not in gr.outputs and gr.consumers.get(name, []) == [node]

    done = 0
    for t in [n for n in gr.g.node if n.op_type == "Tanh"]:
        scaled = gr.producer.get(t.input[0])
        inner = _operand_of(gr, scaled, "Mul", math.sqrt(2 / math.pi))
        add = gr.producer.get(inner) if inner and sole(t.input[0], t) and sole(inner, scaled) else None
        x = None
        for i in (0, 1) if add is not None and add.op_type == "Add" else ():
            cube_mul = gr.producer.get(add.input[1 - i])
            cube = _operand_of(gr, cube_mul, "Mul", 0.044715)
            pow_ = gr.producer.get(cube) if cube else None
            if (pow_ is not None and _operand_of(gr, pow_, "Pow", 3.0) == add.input[i] and pow_.input[0] == add.input[i]
                    and sole(add.input[1 - i], add) and sole(cube, cube_mul)):
                x = add.input[i]
        one = _only_consumer(gr, t.output[0], "Add") if x else None
        half = _only_consumer(gr, one.output[0], "Mul") if one and _operand_of(gr, one, "Add", 1.0) == t.output[0] else None
        last = _only_consumer(gr, half.output[0], "Mul") if half and _operand_of(gr, half, "Mul", 0.5) == one.output[0] else None
        if last is None or _other(last, half.output[0]) != x:
            continue
        gr.g.node.remove(last)  # its output is produced anew below; the chain before it dies
        gr.append(helper.make_node("FastGelu", [x], list(last.output), domain=MS_DOMAIN, name=gr.fresh(f"{last.name}_fast_gelu")))
        done += 1
    return done


def _gather_node(gr: _Graph, table: str, index: str):
    """A ``Gather(table, index)`` node along axis 0 (not added to any graph)."""
    return helper.make_node("Gather", [table, index], [gr.fresh(f"{table}_gathered")], axis=0, name=gr.fresh(f"{table}_gather"))


def _gather(gr: _Graph, table: str, index: str) -> str:
    """``Gather(table, index)`` along axis 0, appended; returns its output."""
    return gr.append(_gather_node(gr, table, index))


def _uniform_groups(gr: _Graph, groups: str) -> tuple[str, str]:
    """(every token of the call in one group, that group) for the token-group index ``groups``, built once per index."""
    if groups not in gr.uniform:
        def node(op: str, inputs: list[str], **attrs) -> str:
            return gr.append(helper.make_node(op, inputs, [gr.fresh(f"{groups}_{op.lower()}")], name=gr.fresh(f"{groups}_{op.lower()}"), **attrs))

        same = node("Equal", [node("ReduceMin", [groups], keepdims=0), node("ReduceMax", [groups], keepdims=0)])
        gr.uniform[groups] = same, node("Gather", [groups, gr.add_init("first_token", np.array(0, np.int64))], axis=0)
    return gr.uniform[groups]


def _fold_cache_writes(gr: _Graph) -> int:
    """``Transpose(p)(X) -> ScatterND(., Unsqueeze(pos, -1), Transpose(p)(U)) -> Transpose(p^-1)``, the
    exporter's ``index_copy`` along axis ``a = p[0]``, becomes ``ScatterND(X, idx, U)`` on ``X``'s own
    layout, ``idx [*U.shape[:a + 1], a + 1]`` the coordinates of every row written (built from ``U``'s
    shape and ``pos``): one copy of the cache instead of three, and whole rows of ``U`` per index.
    (``ScatterElements`` along ``a`` is the same numbers, but onnxruntime runs it element by element,
    3x slower than the transposes.) Writes whose updates have the same shape up to ``a`` (the exporter's
    symbolic shapes: every block's k and v) at the same positions share one ``idx``. Returns the number folded."""
    folded = 0
    shapes = {v.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in v.type.tensor_type.shape.dim]
              for v in [*gr.g.value_info, *gr.g.input] if v.type.tensor_type.HasField("shape")}
    shared: dict[tuple, str] = {}
    for sc in [n for n in gr.g.node if n.op_type == "ScatterND"]:
        t_data, t_upd = gr.producer.get(sc.input[0]), gr.producer.get(sc.input[2])
        t_out = _only_consumer(gr, sc.output[0], "Transpose")
        idx = gr.producer.get(sc.input[1])
        if None in (t_data, t_upd, t_out, idx) or t_data.op_type != "Transpose" or t_upd.op_type != "Transpose":
            continue
        perm = list(_attr(t_data, "perm", []))
        axes = gr.const(idx.input[1]) if idx.op_type == "Unsqueeze" and len(idx.input) > 1 else None
        if (not perm or list(_attr(t_upd, "perm", [])) != perm or _attr(sc, "reduction", b"none") not in ("none", b"none")
                or [perm[i] for i in _attr(t_out, "perm", [])] != list(range(len(perm)))
                or axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, 1)):
            continue
        gr.g.node.remove(t_out)  # its output is produced anew below; the ScatterND and transposes die
        lead = shapes.get(t_upd.input[0], [])[:perm[0] + 1]
        key = (idx.input[0], perm[0], *lead) if len(lead) == perm[0] + 1 and None not in lead and "" not in lead else None
        if key is not None and key in shared:
            rows = shared[key]
        else:
            rows = _row_indices(gr, idx.input[0], t_upd.input[0], perm[0])
            if key is not None:
                shared[key] = rows
        gr.append(helper.make_node("ScatterND", [t_data.input[0], rows, t_upd.input[0]], [t_out.output[0]],
                                   name=gr.fresh(f"{sc.name}_rows")))
        folded += 1
    return folded


def _row_indices(gr: _Graph, positions: str, upd: str, axis: int) -> str:
    """ScatterND indices writing ``upd`` at ``positions`` along ``axis``: ``[*upd.shape[:axis + 1], axis + 1]``,
    entry ``(i_0, ..., i_{axis - 1}, positions[i_axis])``."""
    def node(op: str, inputs: list[str], **attrs) -> str:
        return gr.append(helper.make_node(op, inputs, [gr.fresh(f"{upd}_row_index")], name=gr.fresh(f"{upd}_row_index"), **attrs))

    def const(base: str, value) -> str:
        return gr.add_init(base, np.array(value, np.int64))

    shape = node("Shape", [upd])
    lead = node("Slice", [shape, const("zero_1d", [0]), const("row_index_end", [axis + 1])])
    cols = []
    for d in range(axis + 1):
        coords = positions if d == axis else node("Range", [const("zero", 0), node("Gather", [shape, const("dim", d)], axis=0),
                                                            const("one", 1)])
        coords = node("Reshape", [coords, const("row_index_shape", [-1 if k == d else 1 for k in range(axis + 1)])])
        cols.append(node("Unsqueeze", [node("Expand", [coords, lead]), const("last_axis", [-1])]))
    return node("Concat", cols, axis=-1)


def _b_operand(gr: _Graph, dq_b, u8s8_safe: bool, u8_quantize):
    """(B input, scale, zero point, shifted to uint8) for the GEMM's B side, else None."""
    zp = gr.const(dq_b.input[2]) if len(dq_b.input) > 2 and dq_b.input[2] else None
    scale = gr.const(dq_b.input[1])
    w = gr.const(dq_b.input[0])
    if w is not None:  # a weight: per-tensor or per output channel (axis 1 of [K, N])
        if w.dtype != np.int8 or w.ndim != 2 or scale is None or (zp is not None and np.any(zp != 0)):
            return None
        if scale.size > 1 and (_attr(dq_b, "axis", 1) not in (1, -1) or scale.size != w.shape[1]):
            return None
        if u8s8_safe or (w.min() >= -64 and w.max() <= 63):
            return dq_b.input[0], dq_b.input[1], "", False
        # exact u8u8 instead of a saturating u8s8 GEMM; one zero point per column, as the scale
        wu = gr.add_init(f"{dq_b.input[0].removesuffix('_int8')}_uint8", (w.astype(np.int16) + 128).astype(np.uint8))
        zpu = gr.add_init(f"{dq_b.input[0].removesuffix('_int8')}_zero_point_u8", np.array(128, np.uint8))
        return wu, dq_b.input[1], zpu, True
    q_b = gr.producer.get(dq_b.input[0])  # an activation (attention matmuls): per-tensor only
    if q_b is None or q_b.op_type != "QuantizeLinear" or _scalar_qparams(gr, dq_b) is None:
        return None
    if not u8s8_safe:
        u = u8_quantize(q_b)
        return (u[0], u[1], u[2], True) if u else None
    if not dq_b.input[2:] or not dq_b.input[2]:
        return dq_b.input[0], dq_b.input[1], "", False
    return dq_b.input[0], dq_b.input[1], dq_b.input[2], False


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads any more (the replaced DQs and int8 Qs, the folded
    epilogues); in any node order, since new nodes are appended before the graph is sorted."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    needed, stack, keep = set(), [o.name for o in g.output], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        n = producer.get(name)
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            stack.extend(_reads(n))
    for n in [n for n in g.node if id(n) not in keep]:
        g.node.remove(n)
    for i in [i for i in g.initializer if i.name not in needed]:
        g.initializer.remove(i)
    for v in [v for v in g.value_info if v.name not in needed]:
        g.value_info.remove(v)


def _toposort(model: onnx.ModelProto) -> None:
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        progressed = False
        for n in list(pending):
            if all(i in ready for i in _reads(n)):
                ordered.append(n)
                ready.update(n.output)
                pending.remove(n)
                progressed = True
        if not progressed:
            raise ValueError(f"ONNX graph has a cycle or a missing input at {pending[0].name or pending[0].op_type}")
    del g.node[:]
    g.node.extend(ordered)


def write_ort_int8(src: str | Path, dst: str | Path, *, u8s8_safe: bool | None = None,
                   row_gemms: Sequence[str] = ("*",)) -> dict:
    """Write the onnxruntime int8 variant of the Q/DQ model ``src`` to ``dst`` (atomically); returns the counts.

    ``u8s8_safe`` defaults to whether this CPU has VNNI: the variant is meant for the machine
    that runs it.
    """
    from backends.onnx_export import EXTERNAL_DATA_BYTES
    from backends.ort_runner import cpu_has_vnni

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    counts = lower_for_ort(model, u8s8_safe=cpu_has_vnni() if u8s8_safe is None else u8s8_safe, row_gemms=row_gemms)
    big = sum(i.ByteSize() for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    with atomic_path(dst, suffix=".onnx") as tmp:
        onnx.save(model, tmp, save_as_external_data=big, location=dst.name + ".data")  # data lands beside dst
    return counts
