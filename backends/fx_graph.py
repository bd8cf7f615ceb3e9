"""A quantized GraphModule saved as data, not code: ``graph.json`` (its nodes) + its tensors.

``tools.compile --target torch`` writes them; ``tools.generate --quantized DIR`` rebuilds the
fake-quant GraphModule on the re-traced model's module tree (which supplies the leaf modules
the graph calls: LayerNorm, SiLU, ...), overwritten by the saved tensors. Loading runs no code
from the files: tensors load with ``weights_only=True``, and a call target resolves only to a
``torch.ops`` operator, a function whose own module is one of ``SAFE_MODULES``, or a target of
the re-traced graph. (``graph.py`` beside them is for reading; it is never executed.)
"""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import torch
from torch import fx, nn

from core.errors import UserError
from frontends.generic import load_checkpoint

FORMAT = "arvgq-fx-graph/1"
# pure tensor / arithmetic functions; torch.load lives in torch.serialization and is refused
SAFE_MODULES = ("torch", "torch._C._nn", "torch._C._linalg", "torch._C._fft", "torch._C._special",
                "torch.nn.functional", "torch.functional", "_operator", "operator", "math", "builtins")
SAFE_BUILTINS = ("getattr", "len", "int", "float", "min", "max", "abs", "slice", "range")


def target_name(target) -> str:
    """``ops:arvgq.quantize.default`` for operators, ``module:qualname`` for functions."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"ops:{target}"
    module = sys.modules.get(target.__module__)
    if getattr(module, target.__name__, None) is target:  # torch.mul's qualname is _VariableFunctionsClass.mul
        return f"{target.__module__}:{target.__name__}"
    return f"{target.__module__}:{target.__qualname__}"


def tensors_of(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads: parameters, buffers (non-persistent too) and tensor attributes."""
    out = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in out:
            value = _fetch(gm, n.target)
            if isinstance(value, torch.Tensor):
                out[n.target] = value
    return {k: v.detach() for k, v in out.items()}


def _fetch(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _encode(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (tuple, torch.Size)):
        return {"tuple": [_encode(x) for x in a]}
    if isinstance(a, list):
        return [_encode(x) for x in a]
    if isinstance(a, dict):
        return {"dict": [[k, _encode(v)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start), _encode(a.stop), _encode(a.step)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, (torch.dtype, torch.memory_format, torch.layout)):
        return {"torch": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    raise TypeError(f"cannot save a graph argument of type {type(a).__name__}: {a!r}")


def graph_to_json(gm: fx.GraphModule) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        target = n.target if isinstance(n.target, str) else target_name(n.target)
        nodes.append({"op": n.op, "name": n.name, "target": target,
                      "args": _encode(n.args), "kwargs": _encode(n.kwargs)})
    return {"format": FORMAT, "nodes": nodes}


TENSOR_FILES = ("quantized_state_dict.pt", "weights.safetensors")


def save_graph(gm: fx.GraphModule, directory: str | Path, tensors_file: str = TENSOR_FILES[0]) -> None:
    """Write ``graph.json`` and the tensors: a state dict that ``torch.load(weights_only=True)`` reads, or
    ``weights.safetensors`` (tensors only, no pickle at all)."""
    directory = Path(directory)
    (directory / "graph.json").write_text(json.dumps(graph_to_json(gm)))
    tensors = tensors_of(gm)
    if tensors_file.endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors stores each tensor once: tied or viewed tensors become their own contiguous copies
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(directory / tensors_file))
    else:
        torch.save(tensors, directory / tensors_file)


def _load_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_checkpoint(path)  # weights_only=True


def _resolve(name: str, known: dict):
    if name in known:
        return known[name]
    if name.startswith("ops:"):
        try:
            obj = torch.ops
            for part in name[4:].split("."):
                obj = getattr(obj, part)
            return obj
        except (AttributeError, RuntimeError):
            raise UserError(f"graph.json calls the operator {name[4:]}, which is not registered here") from None
    module, _, qualname = name.partition(":")
    if module not in SAFE_MODULES or (module == "builtins" and qualname not in SAFE_BUILTINS) or "." in qualname:
        raise UserError(f"graph.json calls {module}.{qualname}, which is not an operator, a function of "
                        f"{', '.join(SAFE_MODULES[:3])}, ... or of the re-traced model; refusing to load it")
    fn = getattr(importlib.import_module(module), qualname, None)
    if fn is None or getattr(fn, "__module__", module) not in SAFE_MODULES:
        raise UserError(f"graph.json calls {module}.{qualname}, which is not a function of {module}; refusing it")
    return fn


def _decode(a, nodes: dict):
    if isinstance(a, list):
        return [_decode(x, nodes) for x in a]
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    if kind == "node":
        return nodes[v]
    if kind == "float":
        return float(v)
    if kind == "tuple":
        return tuple(_decode(x, nodes) for x in v)
    if kind == "dict":
        return {k: _decode(x, nodes) for k, x in v}
    if kind == "slice":
        return slice(*(_decode(x, nodes) for x in v))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "device":
        return torch.device(v)
    if kind == "torch":
        obj = getattr(torch, v, None)
        if not isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
            raise UserError(f"graph.json names torch.{v}, which is not a dtype, layout or memory format")
        return obj
    raise UserError(f"graph.json has an argument of unknown kind {kind!r}")


def _set_tensor(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``path`` as a buffer, creating empty parent modules the passes added."""
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif hasattr(mod, leaf) and leaf not in mod._buffers:
        delattr(mod, leaf)
    mod.register_buffer(leaf, value)


def load_graph(directory: str | Path, fp_graph: fx.GraphModule) -> fx.GraphModule:
    """The quantized GraphModule saved in ``directory`` (``graph.json`` and one of ``TENSOR_FILES``).

    ``fp_graph``: the model's FP trace (``frontends.trace``), whose module tree and call targets the
    saved graph was built from; it is modified in place and becomes the root of the result.
    """
    directory = Path(directory)
    graph_file = directory / "graph.json"
    tensors_file = next((directory / f for f in TENSOR_FILES if (directory / f).is_file()), directory / TENSOR_FILES[0])
    for f in (graph_file, tensors_file):
        if not f.is_file():
            raise UserError(f"{f} not found: --quantized needs a directory written by "
                            f"'python -m tools.compile --target torch' (or cuda)")
    try:
        data = json.loads(graph_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {graph_file}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{graph_file} is not a graph written by tools.compile (format {FORMAT})")
    tensors = _load_tensors(tensors_file)
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"{tensors_file} is not a state dict (name -> tensor)")
    fp_tensors = {**dict(fp_graph.named_parameters()), **dict(fp_graph.named_buffers())}
    for k, v in tensors.items():
        if k in fp_tensors and fp_tensors[k].shape != v.shape:
            raise UserError(f"{directory} was compiled from another model: {k} has shape {tuple(v.shape)} "
                            f"there, {tuple(fp_tensors[k].shape)} in this one")
        _set_tensor(fp_graph, k, v)

    known = {target_name(n.target): n.target for n in fp_graph.graph.nodes if callable(n.target)}
    graph, nodes = fx.Graph(), {}
    for spec in data["nodes"]:
        op, target = spec["op"], spec["target"]
        args, kwargs = _decode(spec["args"], nodes), _decode(spec["kwargs"], nodes)
        if op == "call_function":
            target = _resolve(target, known)
        elif op == "call_method" and target.startswith("_"):
            raise UserError(f"graph.json calls the method {target!r}; refusing private methods")
        elif op not in ("placeholder", "get_attr", "call_module", "output", "call_method"):
            raise UserError(f"graph.json has a node of unknown kind {op!r}")
        if op == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(op, target, tuple(args), kwargs, name=spec["name"])
        nodes[spec["name"]] = node
    try:
        return fx.GraphModule(fp_graph, graph)
    except (AttributeError, RuntimeError) as e:
        raise UserError(f"{graph_file} does not fit this model ({e}); was it compiled from this checkpoint?") from None
