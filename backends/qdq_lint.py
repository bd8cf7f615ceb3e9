"""A linter for TensorRT's explicit-quantization rules on a QDQ ONNX model.

TensorRT (reference/tensorrt.md §1.2–§1.4) accepts Q/DQ only as: int8 (or fp8) with zero
zero-points, strictly positive constant scales, per-tensor scales for activations and
per-channel scales only on constant weights, and no DynamicQuantizeLinear / MatMulInteger /
QLinear* ops. An int8 GEMM needs a DequantizeLinear feeding each operand directly (a
Transpose on the weight side is folded at build time). Findings carry the node name and the
module path recovered from the scale initializer's name (``blocks.3.attn.mat_qkv.input``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

FORBIDDEN = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger"}
GEMMS = {"MatMul", "Gemm"}
PASS_THROUGH = {"Transpose", "Reshape"}  # weight-side layout ops TensorRT folds into the GEMM


@dataclass
class Finding:
    rule: str
    node: str
    module: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node} ({self.module or '?'}): {self.message}"


@dataclass
class LintReport:
    violations: list[Finding] = field(default_factory=list)
    quantized_gemms: dict[str, int] = field(default_factory=dict)  # module path -> count
    float_gemms: list[str] = field(default_factory=list)
    q_count: int = 0
    dq_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = [f"QuantizeLinear: {self.q_count}, DequantizeLinear: {self.dq_count}, "
                 f"int8 GEMMs: {sum(self.quantized_gemms.values())}, float GEMMs: {len(self.float_gemms)}"]
        for mod, n in sorted(self.quantized_gemms.items()):
            lines.append(f"  int8 GEMM  {mod}" + (f" x{n}" if n > 1 else ""))
        for name in self.float_gemms:
            lines.append(f"  float GEMM {name}")
        lines.append(f"violations: {len(self.violations)}")
        lines += [f"  {v}" for v in self.violations]
        return "\n".join(lines)


def _module_of(name: str) -> str:
    """``blocks.0.fc1.input_scale`` -> ``blocks.0.fc1.input``; ``fc1.weight_int8`` -> ``fc1.weight``."""
    for suffix in ("_scale", "_zero_point", "_int8"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def lint(model: onnx.ModelProto | str | Path) -> LintReport:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producer = {o: n for n in g.node for o in n.output}
    rep = LintReport()

    def value(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            attr = consts[name].attribute[0]
            return numpy_helper.to_array(attr.t) if attr.type == onnx.AttributeProto.TENSOR else None
        return None

    def bad(rule: str, node, module: str, msg: str) -> None:
        rep.violations.append(Finding(rule, node.name or node.output[0], module, msg))

    for node in g.node:
        if node.op_type in FORBIDDEN:
            bad("forbidden-op", node, "", f"{node.op_type} is not supported by TensorRT; use static Q/DQ")
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_q = node.op_type == "QuantizeLinear"
        rep.q_count += is_q
        rep.dq_count += not is_q
        scale_name = node.input[1]
        module = _module_of(scale_name)
        scale = value(scale_name)
        if scale is None:
            bad("constant-scale", node, module, f"scale {scale_name!r} is computed at run time; TensorRT needs a build-time constant")
            continue
        if not (scale > 0).all():
            bad("positive-scale", node, module, f"scale has {int((scale <= 0).sum())} non-positive value(s)")
        if len(node.input) > 2:
            zp = value(node.input[2])
            if zp is None:
                bad("constant-zero-point", node, module, "zero point is not a constant")
            else:
                if zp.dtype != np.int8:
                    bad("int8", node, module, f"zero point is {zp.dtype}, TensorRT INT8 needs int8")
                if (zp != 0).any():
                    bad("symmetric", node, module, f"zero point is non-zero (max |zp| {int(np.abs(zp).max())}); "
                                                   "fold the offset into the bias (asymmetric Q/DQ is illegal)")
        if scale.size > 1:
            data = node.input[0]
            if is_q or value(data) is None:
                bad("per-tensor-activation", node, module,
                    f"{scale.size} scales on an activation; TensorRT allows per-channel only on constant weights "
                    "(lower per-token scales with Mul/Gather, see DESIGN.md)")

    for node in g.node:
        if node.op_type not in GEMMS:
            continue
        srcs = []
        for inp in node.input[:2]:
            p = producer.get(inp)
            while p is not None and p.op_type in PASS_THROUGH:
                p = producer.get(p.input[0])
            srcs.append(p)
        if all(p is not None and p.op_type == "DequantizeLinear" for p in srcs):
            weight_dq = next((p for p in srcs if value(p.input[0]) is not None), srcs[1])
            mod = _module_of(weight_dq.input[0])
            mod = mod[: -len(".weight")] if mod.endswith(".weight") else mod
            rep.quantized_gemms[mod] = rep.quantized_gemms.get(mod, 0) + 1
        else:
            if any(p is not None and p.op_type == "DequantizeLinear" for p in srcs):
                bad("gemm-fusion", node, "", "only one operand comes from a DequantizeLinear: "
                                             "TensorRT runs this GEMM in float")
            rep.float_gemms.append(node.name or node.output[0])
    return rep
