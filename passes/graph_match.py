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
