"""Where an export failed, in the user's terms: the module path behind a node an error names.

An exception from a target's export (the ONNX exporter, onnxruntime refusing the written model,
a converter) names fx nodes (``layers_0_fc1_input_q``) or ONNX values (``layer_norm_min_1``),
not modules. ``locate`` maps those names back: an fx node's site or ``nn_module_stack``
(looking at its consumers for the Q/DQ nodes passes insert, which carry neither), an ONNX
value's producing or consuming node and the fx node or name scope its metadata records, and
for a value the exporter derived from a node's name (``<node>_min``) the longest fx node name
it starts with. ``export_error`` turns any such exception into one ``PassError`` line.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch.fx as fx

from core.errors import PassError
from passes import infra

_NAME = re.compile(r"[A-Za-z_][\w.]*")
_QUOTED = re.compile(r"['\"`]([A-Za-z_][\w.]*)['\"`]")


def node_module(node: fx.Node, depth: int = 3) -> str | None:
    """The module path of ``node``: its site, its module stack, or the nearest consumer's."""
    frontier = [node]
    for _ in range(depth + 1):
        for n in frontier:
            if path := infra.node_module(n):
                return path
        frontier = [u for n in frontier for u in n.users]
    return None


def _onnx_nodes(out: Path | None, name: str) -> list:
    """ONNX nodes of the models under ``out`` that produce, consume or are called ``name``."""
    if out is None:
        return []
    import onnx

    found = []
    for path in sorted(Path(out).glob("*.onnx")):
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001, S112  (a half-written file: nothing to learn from it)
            continue
        found += [n for n in model.graph.node if name == n.name or name in n.input or name in n.output]
    return found


def _onnx_module(node, fx_nodes: dict[str, fx.Node]) -> str | None:
    props = {p.key: p.value for p in node.metadata_props}
    m = re.match(r"%(\w+)", props.get("pkg.torch.onnx.fx_node", ""))
    if m and m.group(1) in fx_nodes and (mod := node_module(fx_nodes[m.group(1)])):
        return mod
    try:
        scopes = [s for s in ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))[:-1] if s]
    except (ValueError, SyntaxError):
        scopes = []
    return ".".join(scopes) or None


def locate(gm: fx.GraphModule, message: str, out: Path | None = None) -> str | None:
    """``module <path> (node <name>)`` for the first name in ``message`` (quoted ones first) that maps
    to a module; graph inputs and outputs map to none."""
    fx_nodes = {n.name: n for n in gm.graph.nodes if n.op not in ("placeholder", "output")}
    for name in dict.fromkeys(_QUOTED.findall(message) + _NAME.findall(message)):  # quoted names first
        if name in fx_nodes and (mod := node_module(fx_nodes[name])):
            return f"module {mod} (node {name})"
        for onnx_node in _onnx_nodes(out, name):
            if mod := _onnx_module(onnx_node, fx_nodes):
                return f"module {mod} (ONNX {onnx_node.op_type} {onnx_node.name or name})"
        stems = [n for n in fx_nodes if name.startswith(n + "_")]
        if stems and (mod := node_module(fx_nodes[max(stems, key=len)])):
            return f"module {mod} (node {max(stems, key=len)})"
    return None


def export_error(target: str, error: Exception, gm: fx.GraphModule, out: Path | None = None) -> PassError:
    """One line for an unexpected exception of ``--target``'s export: stage, module path, cause."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), "") if lines else ""
    where = locate(gm, text, out) or "module unknown"
    return PassError(f"export (--target {target}) failed at {where}: {type(error).__name__}: {cause[:300]}")
