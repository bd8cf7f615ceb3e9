"""What an fx node does, for the passes that match graph patterns: adds, muls, LayerNorm calls, ops
that only move values (views, splits, casts), reads of metadata only, and how to name a node."""
from __future__ import annotations

import builtins
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


_ADD_FNS = {operator.add, torch.add, aten.add.Tensor}
_MUL_FNS = {operator.mul, torch.mul, aten.mul.Tensor}
LAYER_NORM_FNS = {F.layer_norm, aten.layer_norm.default}
# Ops that only move, split or view values: an element of the result is an element of the input.
_MOVE_METHODS = {"view", "reshape", "chunk", "unbind", "split", "tensor_split", "unsqueeze", "squeeze", "contiguous",
                 "expand", "expand_as", "transpose", "permute", "narrow", "flatten", "unflatten", "clone", "view_as",
                 "reshape_as"}
_MOVE_FNS = {operator.getitem, torch.chunk, torch.unbind, torch.split, torch.tensor_split, torch.reshape,
             torch.unsqueeze, torch.squeeze, torch.narrow, torch.flatten, torch.transpose, torch.permute,
             aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim, aten.chunk.default,
             aten.split.Tensor, aten.unbind.int, aten.clone.default}
CAST_METHODS = {"float", "double", "half", "bfloat16", "to", "type_as"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel"}


def call_of(node: fx.Node, fns: set, methods: set[str]) -> bool:
    return (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target in methods)


def is_add(node: fx.Node) -> bool:
    return call_of(node, _ADD_FNS, {"add", "add_"}) and not node.kwargs and len(node.args) == 2


def is_mul(node: fx.Node) -> bool:
    return call_of(node, _MUL_FNS, {"mul", "mul_"}) and not node.kwargs and len(node.args) == 2


def is_move(node: fx.Node) -> bool:
    return call_of(node, _MOVE_FNS, _MOVE_METHODS | CAST_METHODS) and bool(node.args) and isinstance(node.args[0], fx.Node)


_SAME_LAYOUT_FNS = {aten.contiguous.default, aten.clone.default, torch.clone}
_TRANSPOSE_FNS = {aten.transpose.int, torch.transpose}
_PERMUTE_FNS = {aten.permute.default, torch.permute}


def ndim(node) -> int | None:
    """The rank of the tensor ``node`` computes, when the trace recorded it (torch.export's ``val``)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def keeps_last_axis(node: fx.Node, src: fx.Node) -> bool:
    """``node`` rearranges ``src`` (its first argument) without touching its last axis: ``contiguous``,
    ``clone``, or a transpose/permute of the other axes (``nn.MultiheadAttention``'s
    ``x.transpose(1, 0)`` of batch-first inputs). Channel ``c`` of the result is channel ``c`` of ``src``."""
    if not (node.args and node.args[0] is src):
        return False
    if call_of(node, _SAME_LAYOUT_FNS, {"contiguous", "clone"}):
        return len(node.args) == 1
    rank = ndim(src)
    if rank is None:
        return False
    if call_of(node, _TRANSPOSE_FNS, {"transpose"}):
        dims = node.args[1:]
        return len(dims) == 2 and all(isinstance(d, int) and d % rank != rank - 1 for d in dims)
    if call_of(node, _PERMUTE_FNS, {"permute"}):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return len(dims) == rank and all(isinstance(d, int) for d in dims) and dims[-1] % rank == rank - 1
    return False


def is_metadata_use(node: fx.Node) -> bool:
    """``y.shape``, ``y.size()``...: reads no values, so it does not block folding."""
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the graph output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


def module_scopes(node: fx.Node) -> dict[str, str]:
    """``{module path: class name}`` of the modules whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return {path: getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1]) for path, cls in stack.values()}
