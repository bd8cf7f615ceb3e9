"""Export a (quantized) GraphModule to ONNX with QuantizeLinear/DequantizeLinear.

Uses the dynamo exporter with our Q/DQ translations. Input and output names follow the
model (placeholders in order, outputs in order), initializers keep the module-path names the
passes gave them, and the file is written under a temporary name and renamed at the end so a
failed export leaves nothing behind. Models above 2 GB go to external data automatically.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
import torch.fx as fx

from core.errors import UserError
from core.io import atomic_path
from core.numerics import module_bytes
from passes import ops

OPSET = 19  # FP16 scales and saturate flags on Q/DQ need 19 (reference/tensorrt.md §1.7)
EXTERNAL_DATA_BYTES = 1_800_000_000  # stay clear of protobuf's 2 GB limit


def export_onnx(
    gm: fx.GraphModule,
    example_inputs: tuple,
    path: str | Path,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_shapes=None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    # the exporter logs one warning per missing torchvision op; not ours to show
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # shared Dim names: expected
            program = torch.onnx.export(
                gm.eval(), tuple(example_inputs), dynamo=True, opset_version=OPSET,
                custom_translation_table=ops.ONNX_TRANSLATIONS, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False, report=False)
        with atomic_path(path, suffix=".onnx") as tmp:
            if module_bytes(gm) < EXTERNAL_DATA_BYTES:
                proto = program.model_proto
                fold_weight_transposes(proto)
                onnx.save(proto, tmp)
            else:  # above protobuf's 2 GB: weights go to PATH.data beside the model (transposes stay)
                program.save(tmp, external_data=True)
                data = Path(str(tmp) + ".data")
                if data.exists():
                    os.replace(data, str(path) + ".data")
    except UserError:
        raise
    except Exception as e:
        from backends.failures import locate

        where = locate(gm, str(e))
        raise UserError(f"ONNX export failed{f' at {where}' if where else ''}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return path


def qdq_census(model) -> dict[str, int]:
    """Count of QuantizeLinear / DequantizeLinear / other op types in an ONNX model."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def fold_weight_transposes(model) -> int:
    """``DQ(W_int8[N,K], axis=0) -> Transpose -> MatMul`` becomes ``DQ(W_int8^T[K,N], axis=1) -> MatMul``.

    The exporter writes torch's ``linear`` as a Transpose of the weight. TensorRT folds it, but
    onnxruntime's QDQ fusion needs the DequantizeLinear to feed the MatMul directly, so the
    int8 initializer is stored transposed once, here. Returns the number of weights folded.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    folded = 0
    for t in list(g.node):
        if t.op_type != "Transpose":
            continue
        dq = next((n for n in g.node if t.input[0] in n.output and n.op_type == "DequantizeLinear"), None)
        if dq is None or dq.input[0] not in inits or len(consumers.get(dq.output[0], [])) != 1:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[dq.input[0]])
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        if scale is not None and scale.size > 1 and axis not in (0, -2):
            continue
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(w.T.copy(), dq.input[0]))
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1
        if scale is not None and scale.size > 1 and not any(a.name == "axis" for a in dq.attribute):
            dq.attribute.append(onnx.helper.make_attribute("axis", 1))
        for n in consumers.get(t.output[0], []):
            for k, name in enumerate(n.input):
                if name == t.output[0]:
                    n.input[k] = dq.output[0]
        g.node.remove(t)
        stale = [v for v in g.value_info if v.name in (dq.output[0], t.output[0])]
        for v in stale:  # their recorded shapes were the untransposed ones
            g.value_info.remove(v)
        folded += 1
    return folded
