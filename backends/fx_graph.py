"""A quantized GraphModule saved as data, not code: ``graph.json`` (its nodes) + its tensors.

``tools.compile --target torch`` (and ``cuda``) writes them; ``tools.generate --quantized DIR``
rebuilds the fake-quant GraphModule on the re-traced model's module tree (which supplies the leaf
modules the graph calls: LayerNorm, SiLU, ...), overwritten by the saved tensors. Loading runs no
code from the files. Tensors load with ``weights_only=True`` (or from safetensors). Every node is
checked before anything is built or run: a ``call_function`` may only call ``ALLOWED_FUNCTIONS``
(the torch functions and operators that the saved step graphs of every family use) or an operator
of this project's namespaces (``OPERATOR_NAMESPACES``: the Q/DQ ops and the GPU backend's kernels);
a ``call_method`` only ``ALLOWED_METHODS`` (tensor methods); a ``call_module`` only a leaf module
that the re-traced model itself calls; a ``get_attr`` only a tensor. Names, targets and keyword
names must be plain identifiers or paths of them, because fx turns them into the Python source of
the rebuilt ``forward``. There is no ``getattr``. (``graph.py`` beside them is for reading; it is
never executed.)
"""
from __future__ import annotations

import importlib
import json
import keyword
import math
import operator
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from core.errors import UserError
from frontends.generic import load_checkpoint
from passes.shift_sum import shift_sum_values

FORMAT = "arvgq-fx-graph/1"

# What the step graphs call, measured: the graph.json of every family's tiny model and of the shipped
# MNIST models, compiled with --target torch, cuda and cuda-fp8 under every built-in recipe (minmax,
# smoothquant, ptq4arvg, shiftsum) at W8A8, W6A6 and W4A8; plus the two functions that passes insert
# in cases those runs did not reach (a fold's restore, dynamic Shift-and-Sum). Nothing else is rebuilt.
_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.matmul, operator.eq, operator.ge, operator.getitem,
    torch.add, torch.sub, torch.mul, torch.matmul, torch.mean, torch.rsqrt, torch.stack, torch.where, torch.index_select,
    F.linear, F.gelu, F.silu, F.softmax, F.normalize, F.pad, F.scaled_dot_product_attention,
    torch.addcmul,  # passes/regions.py: a folded tensor restored for its other users
    torch.cat, torch.gather, F.embedding,  # MAR's step: buffer + image rows, gathers by the generation order
    shift_sum_values,  # passes/shift_sum.py, shift-sum{mode=dynamic}: pure tensor arithmetic
)
ALLOWED_METHODS = frozenset((
    "__getitem__", "chunk", "clamp", "clamp_max", "exp", "expand", "flatten", "float", "index_copy", "index_select", "mean",
    "permute", "pow", "softmax", "transpose", "type_as", "unbind", "unflatten", "unsqueeze", "view",
))
# this project's operator namespaces (``ops:<namespace>.<op>.<overload>`` in graph.json) -> the module registering them
OPERATOR_NAMESPACES = {"arvgq": "passes.ops", "arvgq_cuda": "backends.cuda.lower"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PATH_PART = re.compile(r"(?!__)[A-Za-z0-9_]+\Z")  # module names may be digits (ModuleList); no dunders


def target_name(target) -> str:
    """``ops:arvgq.quantize.default`` for operators, ``module:qualname`` for functions."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"ops:{target}"
    module = sys.modules.get(target.__module__)
    if getattr(module, target.__name__, None) is target:  # torch.mul's qualname is _VariableFunctionsClass.mul
        return f"{target.__module__}:{target.__name__}"
    return f"{target.__module__}:{target.__qualname__}"


ALLOWED_FUNCTIONS = {target_name(f): f for f in _FUNCTIONS}


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


def _refuse(what: str) -> UserError:
    return UserError(f"graph.json {what}; refusing to load it (a graph written by tools.compile never does)")


def _operator(name: str):
    """``ns.op.overload`` of one of this project's namespaces, registered by importing its module."""
    parts = name.split(".")
    if (len(parts) != 3 or parts[0] not in OPERATOR_NAMESPACES
            or not all(_IDENTIFIER.match(p) and not p.startswith("_") for p in parts)):
        raise _refuse(f"calls the operator {name!r}, which is not one of this project's "
                      f"({', '.join(f'torch.ops.{ns}.*' for ns in OPERATOR_NAMESPACES)})")
    importlib.import_module(OPERATOR_NAMESPACES[parts[0]])
    try:
        op = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise UserError(f"graph.json calls the operator {name}, which is not registered here "
                        f"(written by another version of this project?)") from None
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != parts[0]:
        raise _refuse(f"calls {name!r}, which is not an operator")
    return op


def _function(name) -> object:
    if not isinstance(name, str):
        raise _refuse(f"has a call target that is not a name: {name!r}")
    if name.startswith("ops:"):
        return _operator(name[4:])
    if name not in ALLOWED_FUNCTIONS:
        raise _refuse(f"calls {name.replace(':', '.')}, which is not among the functions a quantized step graph uses")
    return ALLOWED_FUNCTIONS[name]


def _check_path(path, what: str) -> str:
    if not isinstance(path, str) or not path or not all(_PATH_PART.match(p) for p in path.split(".")):
        raise _refuse(f"names the {what} {path!r}, which is not a dotted path of plain names")
    return path


def _decode(a, nodes: dict):
    """Plain data of graph.json back into node arguments; ``nodes`` maps the names defined so far."""
    if isinstance(a, list):
        return [_decode(x, nodes) for x in a]
    if not isinstance(a, dict):
        return a  # JSON scalars: None, bool, int, float, str
    if len(a) != 1:
        raise _refuse(f"has an argument with keys {sorted(a)}, not one kind")
    (kind, v), = a.items()
    if kind == "node":
        if not isinstance(v, str) or v not in nodes:
            raise _refuse(f"uses the node {v!r} before (or without) defining it")
        return nodes[v]
    if kind == "float":
        try:
            if isinstance(v, str):
                return float(v)
        except ValueError:
            pass
        raise _refuse(f"has a float {v!r} that is not a number")
    if kind in ("tuple", "dict", "slice") and not isinstance(v, list):
        raise _refuse(f"has a {kind} argument that is not a list")
    if kind == "tuple":
        return tuple(_decode(x, nodes) for x in v)
    if kind == "dict":
        if not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str) for kv in v):
            raise _refuse("has a dict argument whose items are not [name, value] pairs")
        return {k: _decode(x, nodes) for k, x in v}
    if kind == "slice":
        if len(v) != 3:
            raise _refuse("has a slice argument without (start, stop, step)")
        return slice(*(_decode(x, nodes) for x in v))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "device":
        try:
            return torch.device(v)
        except (RuntimeError, TypeError):
            raise _refuse(f"names the device {v!r}") from None
    if kind == "torch":
        obj = getattr(torch, v, None) if isinstance(v, str) and _IDENTIFIER.match(v) else None
        if not isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
            raise UserError(f"graph.json names torch.{v}, which is not a dtype, layout or memory format")
        return obj
    raise UserError(f"graph.json has an argument of unknown kind {kind!r}")


def _set_tensor(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``path`` as a buffer, creating empty parent modules the passes added.

    Only modules, parameters, buffers and tensor attributes are replaced; any other attribute of
    that name (a method, a setting) makes the file refused.
    """
    *parents, leaf = _check_path(path, "tensor").split(".")
    mod = root
    for p in parents:
        if p in mod._modules:
            mod = mod._modules[p]
            continue
        if hasattr(mod, p):
            raise _refuse(f"stores the tensor {path!r} under {p!r}, which is not a module of the model")
        mod.add_module(p, nn.Module())
        mod = mod._modules[p]
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    elif isinstance(mod.__dict__.get(leaf), torch.Tensor):
        delattr(mod, leaf)
    elif leaf not in mod._buffers and hasattr(mod, leaf):
        raise _refuse(f"stores the tensor {path!r} over {leaf!r}, which is not a tensor of the model")
    mod.register_buffer(leaf, value)


def _tensor_at(root: nn.Module, path: str):
    """The tensor at ``path`` (modules, then a parameter, buffer or tensor attribute), else None; no getattr."""
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        mod = mod._modules.get(p)
        if mod is None:
            return None
    for table in (mod._parameters, mod._buffers, mod.__dict__):
        value = table.get(leaf)
        if isinstance(value, torch.Tensor):
            return value
    return None


_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


def check_nodes(data) -> list[dict]:
    """Every node of a graph.json, checked before anything is loaded or run (see the module docstring);
    returns them with ``call_function`` targets resolved under ``fn``."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
        raise _refuse("has no list of nodes")
    names: dict[str, str] = {}
    checked = []
    for i, spec in enumerate(data["nodes"]):
        if not isinstance(spec, dict) or not {"op", "name", "target", "args", "kwargs"} <= set(spec):
            raise _refuse(f"has a node #{i} without op, name, target, args and kwargs")
        op, name, target = spec["op"], spec["name"], spec["target"]
        if op not in _OPS:
            raise UserError(f"graph.json has a node of unknown kind {op!r}")
        if not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name) or name in names:
            raise _refuse(f"has a node named {name!r} (not an identifier, or defined twice)")
        args, kwargs = _decode(spec["args"], names), _decode(spec["kwargs"], names)
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise _refuse(f"has node {name!r} whose args are not a tuple or whose kwargs are not a dict")
        bad = [k for k in kwargs if not _IDENTIFIER.match(k) or keyword.iskeyword(k)]
        if bad:
            raise _refuse(f"passes node {name!r} a keyword named {bad[0]!r}")
        fn = None
        if op == "call_function":
            fn = _function(target)
        elif op == "call_method":
            if target not in ALLOWED_METHODS:
                raise _refuse(f"calls the method {target!r}, which is not among the tensor methods a quantized step "
                              f"graph uses")
            if not args:
                raise _refuse(f"calls the method {target!r} on nothing")
        elif op in ("get_attr", "call_module"):
            _check_path(target, "attribute" if op == "get_attr" else "module")
        elif op == "placeholder":
            if not isinstance(target, str) or not _IDENTIFIER.match(target) or keyword.iskeyword(target):
                raise _refuse(f"has an input named {target!r}, which is not an identifier")
        elif op == "output":
            if len(args) != 1 or i != len(data["nodes"]) - 1:
                raise _refuse("has an output node that is not the last node or returns more than one value")
        names[name] = name
        checked.append({**spec, "fn": fn})
    if checked[-1]["op"] != "output":
        raise _refuse("has no output node")
    return checked


def load_graph(directory: str | Path, fp_graph: fx.GraphModule) -> fx.GraphModule:
    """The quantized GraphModule saved in ``directory`` (``graph.json`` and one of ``TENSOR_FILES``).

    ``fp_graph``: the model's FP trace (``frontends.trace``), whose module tree and call targets the
    saved graph was built from; it is modified in place and becomes the root of the result. Every
    node is checked (``check_nodes``) before the tensors are read or the graph is built.
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
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {graph_file}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{graph_file} is not a graph written by tools.compile (format {FORMAT})")
    try:
        specs = check_nodes(data)
    except RecursionError:
        raise _refuse("nests its arguments too deeply") from None
    leaves = {n.target for n in fp_graph.graph.nodes if n.op == "call_module"}
    for spec in specs:
        if spec["op"] == "call_module" and spec["target"] not in leaves:
            raise _refuse(f"calls the module {spec['target']!r}, which the model's own step does not call")

    tensors = _load_tensors(tensors_file)
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"{tensors_file} is not a state dict (name -> tensor)")
    fp_tensors = {**dict(fp_graph.named_parameters()), **dict(fp_graph.named_buffers())}
    for k, v in tensors.items():
        if k in fp_tensors and fp_tensors[k].shape != v.shape:
            raise UserError(f"{directory} was compiled from another model: {k} has shape {tuple(v.shape)} "
                            f"there, {tuple(fp_tensors[k].shape)} in this one")
        _set_tensor(fp_graph, k, v)
    for spec in specs:
        if spec["op"] == "get_attr" and _tensor_at(fp_graph, spec["target"]) is None:
            raise UserError(f"{graph_file} reads {spec['target']!r}, which is no tensor of this model or of "
                            f"{tensors_file.name}; was it compiled from this checkpoint?")

    graph, nodes = fx.Graph(), {}
    for spec in specs:
        op = spec["op"]
        args, kwargs = _decode(spec["args"], nodes), _decode(spec["kwargs"], nodes)
        if op == "output":
            graph.output(args[0])
            continue
        target = spec["fn"] if op == "call_function" else spec["target"]
        nodes[spec["name"]] = graph.create_node(op, target, tuple(args), kwargs, name=spec["name"])
    try:
        return fx.GraphModule(fp_graph, graph)
    except (AttributeError, RuntimeError) as e:
        raise UserError(f"{graph_file} does not fit this model ({e}); was it compiled from this checkpoint?") from None
