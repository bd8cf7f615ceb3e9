"""Summarise what TensorRT made of our model: ``IEngineInspector`` JSON -> precisions, Reformats, modules.

The inspector reports per-layer formats only when the engine was built with
``ProfilingVerbosity.DETAILED`` (builder.py sets it); TensorRT's advice for checking fusion and
per-layer precision is exactly this dump (``trtexec --profilingVerbosity=detailed --dumpLayerInfo``,
reference/tensorrt.md §1.4). The summary is a pure function over the JSON
(:func:`summarize_layers`), tested on a hand-written sample; :func:`inspect_engine` is the only
TensorRT call and has not run here (§0).

Layer names carry ONNX node names (``node_MatMul_31``), fused with ``+``
(``fc1.weight_int8 + node_dequantize_5 + node_MatMul_31``) or wrapped as Myelin
``{ForeignNode[node_a...node_b]}``, and constant layers carry our initializer names
(``blocks.3.attn.mat_qkv.weight_int8``). Module paths come from the initializer names and
from the exporter's ``pkg.torch.onnx.name_scopes`` node metadata (:func:`onnx_node_modules`).
"""
from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

# narrowest first: a layer's precision is the narrowest datatype among its inputs (an INT8 GEMM
# reads int8 and may write FP16/FP32: "INT8-IN-FP32-OUT", reference/tensorrt.md §1.3)
_PRECISIONS = [("fp4", r"fp4|e2m1"), ("int4", r"int4"), ("fp8", r"fp8|e4m3"), ("int8", r"int8"),
               ("fp16", r"fp16|half"), ("bf16", r"bf16|bfloat16"), ("fp32", r"fp32|float"),
               ("int32", r"int32"), ("int64", r"int64"), ("bool", r"bool")]
_QUANT_SUFFIXES = ("_int8", "_scale", "_zero_point")
_INIT_RE = re.compile(r"[A-Za-z_][\w]*(?:\.[\w]+)+")  # dotted names: our initializers / module paths
_FOREIGN_RE = re.compile(r"ForeignNode\[(.*?)\]")
_REFORMAT_RE = re.compile(r"Reformatting CopyNode for (?:Input|Output) Tensor \d+ to ")


def datatype_of(fmt: str) -> str | None:
    """``"Row major linear Int8 format"`` -> ``"int8"``; None when no datatype is named."""
    low = fmt.lower()
    for name, pattern in _PRECISIONS:
        if re.search(pattern, low):
            return name
    return None


def layer_precision(layer: Mapping) -> str:
    """Narrowest datatype among a layer's inputs, else its outputs, else ``"unknown"``."""
    for side in ("Inputs", "Outputs"):
        kinds = [datatype_of(str(t.get("Format/Datatype", ""))) for t in layer.get(side, []) if isinstance(t, Mapping)]
        kinds = [k for k in kinds if k]
        if kinds:
            return min(kinds, key=[n for n, _ in _PRECISIONS].index)
    return "unknown"


def is_reformat(layer: Mapping) -> bool:
    return layer.get("LayerType") == "Reformat" or "Reformatting CopyNode" in str(layer.get("Name", ""))


def name_tokens(name: str) -> list[str]:
    """The ONNX node / initializer names inside one TensorRT layer name (fused with ``+``,
    Myelin ``ForeignNode[a...b]`` ranges, ``[ONNX Layer: x]`` metadata)."""
    text = name.replace("[ONNX Layer:", " + ").replace("{", " ").replace("}", " ")
    text = _REFORMAT_RE.sub(" + ", text)  # "... Input Tensor 0 to node_MatMul_40": the consumer
    text = _FOREIGN_RE.sub(lambda m: " + ".join(m.group(1).split("...")), text)
    return [t.strip(" []") for t in re.split(r"\s\+\s|\x1f|\n", text) if t.strip(" []")]


def _module_of_initializer(token: str) -> str | None:
    """``blocks.3.attn.mat_qkv.weight_int8`` -> ``blocks.3.attn.mat_qkv``; None if not one of ours."""
    for m in _INIT_RE.finditer(token):
        name = m.group(0)
        for suffix in _QUANT_SUFFIXES:
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                return base.rsplit(".", 1)[0] if base.rsplit(".", 1)[-1] in ("weight", "input", "output") else base
    return None


def modules_of_layer(name: str, node_modules: Mapping[str, str] | None = None) -> list[str]:
    """Module paths a TensorRT layer name refers to, in order, without repeats."""
    node_modules = node_modules or {}
    found: list[str] = []
    for token in name_tokens(name):
        mod = node_modules.get(token) or _module_of_initializer(token)
        if mod and mod not in found:
            found.append(mod)
    return found


def summarize_layers(info: Mapping, node_modules: Mapping[str, str] | None = None) -> dict:
    """Inspector JSON (``{"Layers": [...]}``) -> layers by precision, Reformat count, modules.

    With profiling verbosity below DETAILED the layers are bare names; then precisions are
    ``unknown`` and the summary says so.
    """
    layers = list(info.get("Layers", []))
    detailed = all(isinstance(layer, Mapping) for layer in layers)
    layers = [layer if isinstance(layer, Mapping) else {"Name": str(layer)} for layer in layers]
    by_precision: Counter = Counter()
    modules: dict[str, dict] = {}
    for layer in layers:
        prec = layer_precision(layer)
        by_precision[prec] += 1
        for mod in modules_of_layer(str(layer.get("Name", "")) + " + " + str(layer.get("Metadata", "")),
                                    node_modules):
            entry = modules.setdefault(mod, {"layers": [], "precisions": []})
            entry["layers"].append(layer.get("Name", ""))
            if prec not in entry["precisions"]:
                entry["precisions"].append(prec)
    return {
        "layers": len(layers),
        "detailed": detailed and bool(layers),
        "by_precision": dict(sorted(by_precision.items())),
        "reformat_layers": sum(is_reformat(layer) for layer in layers),
        "layer_types": dict(sorted(Counter(str(layer.get("LayerType", "?")) for layer in layers).items())),
        "modules": dict(sorted(modules.items())),
        "int8_modules": sorted(m for m, e in modules.items() if "int8" in e["precisions"]),
    }


def onnx_node_modules(model) -> dict[str, str]:
    """ONNX node name -> module path, from the dynamo exporter's ``pkg.torch.onnx.name_scopes``
    metadata (``['attn', 'attn.qkv', 'linear']`` -> ``attn.qkv``); Q/DQ nodes, whose scope is
    empty, map through their scale initializer (``fc1.input_scale`` -> ``fc1``)."""
    out: dict[str, str] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = []
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            pass
        mod = next((s for s in reversed(scopes[:-1]) if s), "") if len(scopes) > 1 else ""
        if not mod and node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1:
            mod = _module_of_initializer(node.input[1]) or ""
        if mod and node.name:
            out[node.name] = mod
    return out


def inspect_engine(engine_path: str | Path, onnx_path: str | Path | None = None) -> dict:
    """Deserialise ``engine_path`` and summarise its ``IEngineInspector`` JSON (needs TensorRT + GPU)."""
    from backends.tensorrt import availability
    from core.errors import UserError

    reason = availability()  # before any TensorRT runtime call (reference/tensorrt.md §1.10)
    if reason is not None:
        raise UserError(f"cannot inspect a TensorRT engine: {reason}")
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise UserError(f"TensorRT could not deserialise {engine_path}")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    node_modules = {}
    if onnx_path is not None:
        import onnx

        node_modules = onnx_node_modules(onnx.load(str(onnx_path), load_external_data=False))
    return summarize_layers(info, node_modules)
