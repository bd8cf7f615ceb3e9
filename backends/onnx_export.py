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
import tempfile
import warnings
from pathlib import Path

import torch
import torch.fx as fx

from passes import ops
from passes.diagnostics import UserError

OPSET = 19  # FP16 scales and saturate flags on Q/DQ need 19 (reference/tensorrt.md §1.7)


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
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.stem}-")
    os.close(fd)
    log = io.StringIO()
    # the exporter logs one warning per missing torchvision op; not ours to show
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                gm.eval(), tuple(example_inputs), dynamo=True, opset_version=OPSET,
                custom_translation_table=ops.ONNX_TRANSLATIONS, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False, report=False)
        program.save(tmp)
        os.replace(tmp, path)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def qdq_census(model) -> dict[str, int]:
    """Count of QuantizeLinear / DequantizeLinear / other op types in an ONNX model."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
