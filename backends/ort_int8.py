"""onnxruntime-specific int8 variant of an exported Q/DQ graph.

Our default export is TensorRT-shaped: int8 (s8) activations, ``Q -> DQ -> MatMul <- DQ(W)``,
float GEMM outputs. onnxruntime's CPU QDQ fusions leave that graph in float on x86 without
VNNI (it only fuses s8 activations where u8s8 cannot overflow), so here every quantized GEMM
is rewritten into the contrib op onnxruntime runs on its int8 kernels::

    Q(x, s, z) -> DQ -> MatMul(., DQ(W_int8, w_s)) [-> Add(bias)]
      ==>  Q(x, s, z + 128 as uint8) -> MatMulIntegerToFloat(q, W_int8, s, w_s, z + 128, bias)

The uint8 code is the int8 code plus 128 (both clamp to 256 levels), and the GEMM accumulates
in int32, so the result equals the fake-quant graph up to float32 rounding. Everything else
(token-group rescale and zero-point correction, norms, attention) stays as exported.

x86 without VNNI computes u8 x s8 with ``vpmaddubsw``, which saturates a pair of products in
int16 unless |w| <= 64 (7-bit weights, ``weight-quant{reduce_range=true}``). A weight, or an
int8 activation used as the B operand, that may exceed that range on such a CPU is shifted to
uint8 as well (zero point 128): onnxruntime then uses its u8u8 kernel, exact but slower.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.io import atomic_path

MS_DOMAIN = "com.microsoft"


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}
        self._names = {n.name for n in self.g.node} | set(self.inits) | set(self.producer)

    def const(self, name: str):
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

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


def lower_for_ort(model: onnx.ModelProto, *, u8s8_safe: bool) -> dict:
    """Rewrite every quantized MatMul of ``model`` (in place) into MatMulIntegerToFloat.

    ``u8s8_safe``: the CPU has VNNI, so u8 x s8 cannot saturate whatever the weights (see the
    module doc). Returns counts: ``int8_gemms`` (u8 x s8), ``u8u8_gemms`` (B shifted to uint8
    because it could saturate), ``float_matmuls`` (MatMuls left in float).
    """
    gr = _Graph(model)
    u8_of: dict[str, tuple[str, str, str]] = {}  # int8 Q output -> (uint8 twin, scale, uint8 zero point)
    counts = {"int8_gemms": 0, "u8u8_gemms": 0, "float_matmuls": 0}
    replaced: list = []

    def u8_quantize(q) -> tuple[str, str, str] | None:
        """(uint8 output, scale, uint8 zero point) of the twin of int8 Q node ``q``."""
        qp = _scalar_qparams(gr, q)
        if qp is None:
            return None
        scale, zp = qp
        if q.output[0] not in u8_of:
            zp_name = gr.add_init(f"{q.input[1].removesuffix('_scale')}_zero_point_u8", np.array(int(zp) + 128, np.uint8))
            out = gr.fresh(f"{q.output[0]}_u8")
            gr.g.node.append(helper.make_node("QuantizeLinear", [q.input[0], scale, zp_name], [out],
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
        add = gr.consumers.get(out, [])
        if out not in gr.outputs and len(add) == 1 and add[0].op_type == "Add":
            other = add[0].input[1] if add[0].input[0] == out else add[0].input[0]
            c = gr.const(other)
            n_out = gr.const(b_name).shape[-1] if gr.const(b_name) is not None else None
            if c is not None and c.ndim == 1 and c.dtype == np.float32 and c.shape[0] == n_out:
                bias, out = other, add[0].output[0]
                replaced.append(add[0])
        inputs = [a[0], b_name, a[1], b_scale, a[2], b_zp, bias]
        while inputs[-1] == "":
            inputs.pop()
        gr.g.node.append(helper.make_node("MatMulIntegerToFloat", inputs, [out], domain=MS_DOMAIN,
                                          name=gr.fresh(f"{mm.name or mm.output[0]}_int8")))
        replaced.append(mm)
        counts["u8u8_gemms" if shifted else "int8_gemms"] += 1
    for n in replaced:
        gr.g.node.remove(n)
    _toposort(model)  # the new nodes were appended at the end
    _prune(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


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
    """Drop nodes and initializers nothing reads any more (the replaced DQs and int8 Qs)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    dead = [n for n in g.node if n not in keep]
    for n in dead:
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
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
                pending.remove(n)
                progressed = True
        if not progressed:
            raise ValueError(f"ONNX graph has a cycle or a missing input at {pending[0].name or pending[0].op_type}")
    del g.node[:]
    g.node.extend(ordered)


def write_ort_int8(src: str | Path, dst: str | Path, *, u8s8_safe: bool | None = None) -> dict:
    """Write the onnxruntime int8 variant of the Q/DQ model ``src`` to ``dst`` (atomically); returns the counts.

    ``u8s8_safe`` defaults to whether this CPU has VNNI: the variant is meant for the machine
    that runs it.
    """
    from backends.onnx_export import EXTERNAL_DATA_BYTES
    from backends.ort_runner import cpu_has_vnni

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    counts = lower_for_ort(model, u8s8_safe=cpu_has_vnni() if u8s8_safe is None else u8s8_safe)
    big = sum(i.ByteSize() for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    with atomic_path(dst, suffix=".onnx") as tmp:
        onnx.save(model, tmp, save_as_external_data=big, location=dst.name + ".data")  # data lands beside dst
    return counts
