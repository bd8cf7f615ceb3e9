"""Scale-folding regions: where a per-channel ``y -> (y - p) / s`` can be absorbed exactly.

A region is a *source*, an op whose per-channel output scale and shift are parameters we can
edit, and its *sinks*, the linears that take exactly the source's output as their input
(Brevitas' region analysis, style.md §5). Folding a channel transform ``(s, p)`` into a region
turns the tensor between them into ``y' = (y - p) / s`` (per channel c of the last axis) and
compensates in every sink, so the sinks' outputs do not change::

    W y + b = W (s ⊙ y' + p) + b = (W·diag(s)) y' + (b + W p)

How each source absorbs ``(y - p) / s`` (method.md §3.4):

==================  ==========================================================================
LayerNorm (affine)  ``gamma <- gamma / s``, ``beta <- (beta - p) / s`` (beta created when absent)
RMSNorm             ``weight <- weight / s``; a ``bias`` buffer, added after the norm when a
                    shift is folded, ``bias <- (bias - p) / s`` (LlamaGen's edited RMSNorm)
AdaLN modulation    ``y = n * (kappa + scale) + shift`` where scale and shift are rows of a
                    linear's output (VAR ``ada_lin``, RAR ``adaLN_modulation``, any chunk order):
                    ``kappa <- kappa / s`` (the constant ``1`` becomes a per-channel buffer),
                    scale rows ``W, b <- W / s, b / s``, shift rows ``W <- W / s``,
                    ``b <- (b - p) / s``
Linear              output rows ``W <- diag(1/s) W``, ``b <- (b - p) / s``
==================  ==========================================================================

A region is rejected, with the reason in ``ctx.notes``, when the source's output also feeds
something other than a linear's input (a residual add, an attention matmul...), when a tensor
it would edit is shared with another part of the model (tied weights), or when AdaLN
modulation rows are used elsewhere. Reading ``.shape``/``.size()`` of the output is harmless.

``FoldingPass`` is the template of the passes that fold (smooth, sym-shift, gps): find the
regions, compute one transform per region on the graph as found, fold them all, and keep the
observed statistics of the folded tensors exact where they can be (``FoldedObserver``).
"""
from __future__ import annotations

import abc
import builtins
import copy
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from calib.observers import TensorObserver
from core.errors import UserError
from passes.canonicalize import is_linear
from passes.infra import Pass, PassContext, PassResult, get_attr, register, set_buffer

aten = torch.ops.aten

# -- op classification -------------------------------------------------------------------------

_ADD_FNS = {operator.add, torch.add, aten.add.Tensor}
_MUL_FNS = {operator.mul, torch.mul, aten.mul.Tensor}
_LAYER_NORM_FNS = {F.layer_norm, aten.layer_norm.default}
# Ops that only move, split or view values: an element of the result is an element of the input.
_MOVE_METHODS = {"view", "reshape", "chunk", "unbind", "split", "tensor_split", "unsqueeze", "squeeze", "contiguous",
                 "expand", "expand_as", "transpose", "permute", "narrow", "flatten", "unflatten", "clone", "view_as",
                 "reshape_as"}
_MOVE_FNS = {operator.getitem, torch.chunk, torch.unbind, torch.split, torch.tensor_split, torch.reshape,
             torch.unsqueeze, torch.squeeze, torch.narrow, torch.flatten, torch.transpose, torch.permute,
             aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim, aten.chunk.default,
             aten.split.Tensor, aten.unbind.int, aten.clone.default}
_CAST_METHODS = {"float", "double", "half", "bfloat16", "to", "type_as"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel"}


def _call(node: fx.Node, fns: set, methods: set[str]) -> bool:
    return (node.op == "call_function" and node.target in fns) or (node.op == "call_method" and node.target in methods)


def is_add(node: fx.Node) -> bool:
    return _call(node, _ADD_FNS, {"add", "add_"}) and not node.kwargs and len(node.args) == 2


def is_mul(node: fx.Node) -> bool:
    return _call(node, _MUL_FNS, {"mul", "mul_"}) and not node.kwargs and len(node.args) == 2


def _is_move(node: fx.Node) -> bool:
    return _call(node, _MOVE_FNS, _MOVE_METHODS | _CAST_METHODS) and bool(node.args) and isinstance(node.args[0], fx.Node)


def _is_metadata_use(node: fx.Node) -> bool:
    """``y.shape``, ``y.size()``...: reads no values, so it does not block folding."""
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the graph output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


def _module_scopes(node: fx.Node) -> dict[str, str]:
    """``{module path: class name}`` of the modules whose forward produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    return {path: getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1]) for path, cls in stack.values()}


# -- tensor edits -------------------------------------------------------------------------------

def _assign(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Overwrite the parameter or buffer at ``target`` in place with ``value`` (same shape)."""
    t = get_attr(gm, target)
    with torch.no_grad():
        t.copy_(value.to(t.dtype))


def _bias_name(weight_target: str) -> str:
    """Where the bias of a weight lives: ``a.b.weight`` -> ``a.b.bias``, ``ln_weight`` -> ``ln_bias``."""
    stem = weight_target[: -len("weight")] if weight_target.endswith("weight") else weight_target + "_"
    return stem + "bias"


def _ensure_arg_tensor(gm: fx.GraphModule, node: fx.Node, index: int, kw: str, target: str, like: torch.Tensor) -> str:
    """The ``get_attr`` target feeding ``node``'s argument ``index`` (keyword ``kw``).

    When that argument is ``None``, a zero buffer shaped like ``like`` is registered at
    ``target`` and wired in: the bias a folded shift needs (method.md §3.4, "a bias is created
    when absent").
    """
    arg = node.kwargs.get(kw) if kw in node.kwargs else (node.args[index] if len(node.args) > index else None)
    if isinstance(arg, fx.Node):
        if arg.op != "get_attr":
            raise UserError(f"{node.name}: argument {kw} is computed ({arg.name}), not a parameter; cannot fold into it")
        return arg.target
    if arg is not None:
        raise UserError(f"{node.name}: argument {kw} is the constant {arg!r}; cannot fold into it")
    set_buffer(gm, target, torch.zeros_like(like, dtype=torch.float32))
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(target)
    if kw in node.kwargs:
        node.update_kwarg(kw, attr)
    else:
        args = list(node.args) + [None] * (index + 1 - len(node.args))
        args[index] = attr
        node.args = tuple(args)
    return target


def _ensure_linear_bias(gm: fx.GraphModule, linear: fx.Node) -> str:
    w_target = linear.args[1].target
    return _ensure_arg_tensor(gm, linear, 2, "bias", _bias_name(w_target), get_attr(gm, w_target)[:, 0])


def _scale_shift(value: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``(value - shift) / scale`` in float64, either part optional."""
    v = value.double()
    if shift is not None:
        v = v - shift
    if scale is not None:
        v = v / scale
    return v


# -- sources ------------------------------------------------------------------------------------

class Source(abc.ABC):
    """An op whose output ``y`` can become ``(y - p) / s`` by editing its parameters.

    ``output`` is the fx node carrying ``y``; ``tensors`` the targets ``fold`` edits (checked
    for sharing before a region is accepted).
    """

    kind: ClassVar[str] = ""

    def __init__(self, name: str, output: fx.Node, channels: int):
        self.name, self.output, self.channels = name, output, channels

    @abc.abstractmethod
    def tensors(self) -> list[str]:
        """The parameter/buffer targets ``fold`` edits."""

    def shift_blocker(self) -> str | None:
        """Why a shift ``p`` cannot be folded here, or None when it can."""
        return None

    @abc.abstractmethod
    def fold(self, gm: fx.GraphModule, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """Edit the source's parameters so its output becomes ``(y - shift) / scale``."""

    def __repr__(self) -> str:
        return f"{self.kind}({self.name})"


class LayerNormSource(Source):
    """``nn.LayerNorm`` with an affine weight, or ``F.layer_norm`` with a ``get_attr`` weight:
    ``gamma <- gamma / s``, ``beta <- (beta - p) / s``."""

    kind = "layernorm"

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        self.node = node
        if node.op == "call_module":
            self.weight = f"{node.target}.weight"
        else:
            self.weight = (node.kwargs.get("weight") or node.args[2]).target
        name = node.target if node.op == "call_module" else (
            self.weight.rsplit(".", 1)[0] if "." in self.weight else node.name)
        super().__init__(name, node, int(get_attr(gm, self.weight).numel()))

    @staticmethod
    def match(gm: fx.GraphModule, node: fx.Node) -> LayerNormSource | None:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            ok = isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None
        elif node.op == "call_function" and node.target in _LAYER_NORM_FNS:
            w = node.kwargs.get("weight", node.args[2] if len(node.args) > 2 else None)
            ok = isinstance(w, fx.Node) and w.op == "get_attr"
        else:
            ok = False
        return LayerNormSource(gm, node) if ok else None

    def _bias(self, gm: fx.GraphModule) -> str | None:
        if self.node.op == "call_module":
            return f"{self.node.target}.bias" if gm.get_submodule(self.node.target).bias is not None else None
        b = self.node.kwargs.get("bias", self.node.args[3] if len(self.node.args) > 3 else None)
        return b.target if isinstance(b, fx.Node) else None

    def tensors(self) -> list[str]:
        return [self.weight]  # the bias is checked when it exists: see find_regions

    def fold(self, gm, scale, shift) -> None:
        bias = self._bias(gm)
        if bias is None and shift is not None:
            bias = _bias_name(self.weight)
            if self.node.op == "call_module":
                set_buffer(gm, bias, torch.zeros(self.channels))
            else:
                _ensure_arg_tensor(gm, self.node, 3, "bias", bias, get_attr(gm, self.weight))
        if scale is not None:
            _assign(gm, self.weight, _scale_shift(get_attr(gm, self.weight), scale, None))
        if bias is not None:
            _assign(gm, bias, _scale_shift(get_attr(gm, bias), scale, shift))


class RMSNormSource(Source):
    """A module whose class name contains ``RMSNorm`` and that ends in ``out * weight`` (traced
    through, LlamaGen) or is a leaf module with a ``weight`` (``torch.nn.RMSNorm``).

    ``weight <- weight / s``. A shift needs a bias the module does not have: the first shift
    registers ``<path>.bias`` and rewrites the output to ``out * weight + bias``, as the
    reference edits LlamaGen's RMSNorm (method.md §3.4); later folds update that bias.
    """

    kind = "rmsnorm"

    def __init__(self, gm: fx.GraphModule, path: str, core: fx.Node, output: fx.Node):
        self.path, self.core, self.weight = path, core, f"{path}.weight"
        super().__init__(path, output, int(get_attr(gm, self.weight).numel()))

    @staticmethod
    def find(gm: fx.GraphModule) -> list[RMSNormSource]:
        scopes: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            for path, cls in _module_scopes(node).items():
                if "RMSNorm" in cls:
                    scopes.setdefault(path, []).append(node)
        found = []
        for path, nodes in scopes.items():
            core = next((n for n in nodes if n.op == "call_module" and n.target == path), None) or next(
                (n for n in nodes if is_mul(n) and any(isinstance(a, fx.Node) and a.op == "get_attr"
                                                        and a.target == f"{path}.weight" for a in n.args)), None)
            if core is None or not _has_tensor(gm, f"{path}.weight"):
                continue
            output = core
            if len(core.users) == 1:
                (user,) = core.users
                if is_add(user) and any(isinstance(a, fx.Node) and a.op == "get_attr" and a.target == f"{path}.bias"
                                        for a in user.args):
                    output = user
            inside = set(nodes)
            escaping = [n for n in nodes if any(u not in inside for u in n.users)]
            if escaping == [output]:
                found.append(RMSNormSource(gm, path, core, output))
        return found

    def tensors(self) -> list[str]:
        return [self.weight]

    def fold(self, gm, scale, shift) -> None:
        if scale is not None:
            _assign(gm, self.weight, _scale_shift(get_attr(gm, self.weight), scale, None))
        bias = f"{self.path}.bias"
        if self.output is self.core:
            if shift is None:
                return
            set_buffer(gm, bias, torch.zeros(self.channels))
            with gm.graph.inserting_after(self.core):
                attr = gm.graph.get_attr(bias)
            with gm.graph.inserting_after(attr):
                add = gm.graph.call_function(operator.add, (self.core, attr))
            for n in (attr, add):
                n.meta["nn_module_stack"] = copy.copy(self.core.meta.get("nn_module_stack"))
            self.core.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
            self.output = add
        _assign(gm, bias, _scale_shift(get_attr(gm, bias), scale, shift))


def _has_tensor(gm: torch.nn.Module, target: str) -> bool:
    try:
        return isinstance(get_attr(gm, target), torch.Tensor)
    except AttributeError:
        return False


@dataclass
class _Rows:
    """Rows of a linear's output that a tensor's last-axis channels are made of."""

    linear: fx.Node
    rows: torch.Tensor  # LongTensor [C]: channel c is output row rows[c] of `linear`
    terminal: fx.Node


class AdaLNSource(Source):
    """AdaLN modulation ``y = n * (kappa + scale) + shift`` (``kappa`` or ``shift`` may be absent),
    where ``scale`` and ``shift`` are rows of linears' outputs reached by pure indexing
    (``chunk``, ``view(...).unbind``, ``getitem``, ``unsqueeze``...), so any chunk order works:
    VAR's ``gamma1, gamma2, scale1, scale2, shift1, shift2`` and RAR's ``shift_msa, scale_msa,
    gate_msa, ...`` alike. Folding edits the scale and shift rows and turns ``kappa`` into the
    per-channel buffer ``<first sink>.input_kappa`` (method.md §3.4)::

        kappa <- kappa / s ;  W[scale], b[scale] <- / s ;  W[shift] <- / s ; b[shift] <- (b - p) / s
    """

    kind = "adaln"

    def __init__(self, gm, mul: fx.Node, factor: fx.Node, kappa_index: int | None, scale: _Rows, shift: _Rows | None,
                 output: fx.Node):
        self.mul, self.factor, self.kappa_index, self.scale, self.shift = mul, factor, kappa_index, scale, shift
        super().__init__(_adaln_name(scale, shift), output, int(scale.rows.numel()))

    def tensors(self) -> list[str]:
        return [r.linear.args[1].target for r in (self.scale, self.shift) if r is not None]

    def shift_blocker(self) -> str | None:
        return None if self.shift is not None else "the modulation has no shift term to absorb a shift"

    def fold(self, gm, scale, shift) -> None:
        if shift is not None and self.shift is None:
            raise UserError(f"{self.name}: {self.shift_blocker()}")
        if scale is not None and self.kappa_index is not None:
            self._fold_kappa(gm, scale)
        _fold_rows(gm, self.scale, scale, None)
        if self.shift is not None:
            _fold_rows(gm, self.shift, scale, shift)

    def _fold_kappa(self, gm, scale) -> None:
        old = self.factor.args[self.kappa_index]
        kappa = get_attr(gm, old.target) if isinstance(old, fx.Node) else torch.tensor(float(old))
        sink = next(u for u in self.output.users if is_linear(u))
        target = f"{sink.meta.get('site', sink.name)}.input_kappa"
        set_buffer(gm, target, (kappa.double().expand(self.channels) / scale).float())
        if not (isinstance(old, fx.Node) and old.target == target and len(old.users) == 1):
            with gm.graph.inserting_before(self.factor):
                attr = gm.graph.get_attr(target)
            args = list(self.factor.args)
            args[self.kappa_index] = attr
            self.factor.args = tuple(args)


def _fold_rows(gm, part: _Rows, scale, shift) -> None:
    """Rows ``r`` of a linear become ``(row - shift) / scale``: ``W[r] <- W[r] / s``, ``b[r] <- (b[r] - p) / s``."""
    lin, rows = part.linear, part.rows
    w_target = lin.args[1].target
    if scale is not None:
        w = get_attr(gm, w_target).detach().clone()
        w[rows] = _scale_shift(w[rows], scale[:, None], None).to(w.dtype)
        _assign(gm, w_target, w)
    has_bias = len(lin.args) > 2 and lin.args[2] is not None
    if has_bias or shift is not None:
        b_target = _ensure_linear_bias(gm, lin)
        b = get_attr(gm, b_target).detach().clone()
        b[rows] = _scale_shift(b[rows], scale, shift).to(b.dtype)
        _assign(gm, b_target, b)


def _span(rows: torch.Tensor) -> str:
    lo, hi = int(rows.min()), int(rows.max()) + 1
    contiguous = hi - lo == rows.numel() and bool((rows == torch.arange(lo, hi)).all())
    return f"{lo}:{hi}" if contiguous else f"{rows.numel()} rows"


class LinearSource(Source):
    """A linear whose output feeds only linears (linear -> linear): output rows
    ``W <- diag(1/s) W``, ``b <- (b - p) / s`` (bias created when a shift needs it)."""

    kind = "linear"

    def __init__(self, gm, node: fx.Node):
        self.node = node
        super().__init__(node.meta["site"], node, int(get_attr(gm, node.args[1].target).shape[0]))

    @staticmethod
    def match(gm, node: fx.Node) -> LinearSource | None:
        ok = is_linear(node) and "site" in node.meta and node.args[1].op == "get_attr"
        return LinearSource(gm, node) if ok else None

    def tensors(self) -> list[str]:
        return [self.node.args[1].target]

    def fold(self, gm, scale, shift) -> None:
        _fold_rows(gm, _Rows(self.node, torch.arange(self.channels), self.node), scale, shift)


# -- AdaLN: which linear rows each modulation channel comes from ---------------------------------

def _chain_root(node) -> fx.Node | None:
    """The linear whose output ``node`` is, through data-movement ops only; else None."""
    while isinstance(node, fx.Node) and _is_move(node):
        node = node.args[0]
    return node if isinstance(node, fx.Node) and is_linear(node) else None


class _RowProbe(fx.Interpreter):
    """Runs the graph on one batch and, beside the real values, pushes the output-feature index
    of chosen linears through data-movement ops: every tensor derived from such a linear's
    output by indexing alone learns which output row each of its elements is."""

    def __init__(self, gm: fx.GraphModule, linears: set[fx.Node]):
        super().__init__(gm)
        self.linears = linears
        self.index: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.linears:
            self.index[n] = torch.arange(out.shape[-1], dtype=torch.float64).expand(out.shape).contiguous()
        elif _is_move(n) and n.args[0] in self.index:
            if _call(n, set(), _CAST_METHODS):
                self.index[n] = self.index[n.args[0]]
            else:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.index.get(a, self.env.get(a)))
                self.index[n] = getattr(self, n.op)(n.target, args, kwargs)
        return out


class _ModulationRows:
    """Terminal data-movement nodes of modulation linears and the rows they carry."""

    def __init__(self, gm: fx.GraphModule, inputs: tuple, linears: set[fx.Node]):
        probe = _RowProbe(gm, linears)
        with torch.no_grad():
            probe.run(*inputs)
        self.rows: dict[fx.Node, _Rows] = {}
        self.ambiguous: set[fx.Node] = set()
        for node, idx in probe.index.items():
            if not isinstance(idx, torch.Tensor) or all(u in probe.index for u in node.users):
                continue  # a tuple (chunk) or an inner node of the chain
            flat = idx.reshape(-1, idx.shape[-1]) if idx.dim() else idx.reshape(1, 1)
            rows = flat[0].long()
            if (flat == flat[0]).all() and rows.unique().numel() == rows.numel():
                self.rows[node] = _Rows(_chain_root(node), rows, node)
            else:
                self.ambiguous.add(node)

    def terminal(self, node) -> _Rows | None:
        return self.rows.get(node) if isinstance(node, fx.Node) else None

    def overlap(self, part: _Rows) -> fx.Node | None:
        """Another terminal of the same linear that reads any of ``part``'s rows."""
        for node, other in self.rows.items():
            if node is not part.terminal and other.linear is part.linear and torch.isin(other.rows, part.rows).any():
                return node
        return next((n for n in self.ambiguous if _chain_root(n) is part.linear), None)


def _kappa_split(factor) -> tuple[int, fx.Node] | None:
    """``kappa + t`` (either order, kappa a number or a ``get_attr``): (index of kappa, t)."""
    if not (isinstance(factor, fx.Node) and is_add(factor)):
        return None
    for i in (0, 1):
        k, t = factor.args[i], factor.args[1 - i]
        if isinstance(t, fx.Node) and (isinstance(k, (int, float)) or (isinstance(k, fx.Node) and k.op == "get_attr")):
            return i, t
    return None


def _shift_add(mul: fx.Node) -> tuple[fx.Node, object] | None:
    """``mul + shift`` when ``mul``'s only user adds something to it: (the add, shift)."""
    if len(mul.users) == 1:
        (user,) = mul.users
        if is_add(user):
            return user, user.args[1] if user.args[0] is mul else user.args[0]
    return None


def _modulation_candidates(gm: fx.GraphModule) -> set[fx.Node]:
    """Linears that may feed the scale or shift of ``n * (kappa + scale) + shift``."""
    found = set()
    for mul in filter(is_mul, gm.graph.nodes):
        terms = [split[1] for a in mul.args if (split := _kappa_split(a))]
        if (shift := _shift_add(mul)) is not None and _chain_root(shift[1]) is not None:
            terms += [shift[1], *mul.args]  # x * scale + shift, without kappa
        found |= {r for r in map(_chain_root, terms) if r is not None}
    return found


@dataclass
class _Rejected:
    name: str
    output: fx.Node
    reason: str


def _adaln_name(scale: _Rows, shift: _Rows | None) -> str:
    lin = scale.linear.meta.get("site", scale.linear.name)
    return f"{lin}[scale {_span(scale.rows)}" + (f", shift {_span(shift.rows)}]" if shift else "]")


def _match_adaln(gm, mul: fx.Node, mods: _ModulationRows) -> AdaLNSource | _Rejected | None:
    """The modulation ``n * (kappa + scale) + shift`` rooted at ``mul``.

    A modulation has a constant ``kappa`` or a ``shift`` (or both): a bare ``n * rows`` is a
    gate (``gate * attn(x)``) or a gated product (SwiGLU), not a modulation.
    """
    options = []
    for i in (0, 1):
        factor, other = mul.args[i], mul.args[1 - i]
        if not isinstance(factor, fx.Node) or mods.terminal(other) is not None:
            continue
        if (part := mods.terminal(factor)) is not None:
            options.append((factor, None, part))
        elif (split := _kappa_split(factor)) and (part := mods.terminal(split[1])) is not None:
            options.append((factor, split[0], part))
    if len(options) != 1:
        return None
    factor, kappa_index, scale = options[0]
    shift, output = None, mul
    if (found := _shift_add(mul)) is not None and (part := mods.terminal(found[1])) is not None:
        shift, output = part, found[0]
    if kappa_index is None and shift is None:
        return None
    name = _adaln_name(scale, shift)
    for part, consumer in ((scale, factor if kappa_index is not None else mul), (shift, output)):
        if part is None:
            continue
        if len(part.terminal.users) != 1:
            other = next(u for u in part.terminal.users if u is not consumer)
            return _Rejected(name, output, f"its modulation rows {part.terminal.name} also feed {_describe(other)}")
        if (clash := mods.overlap(part)) is not None:
            return _Rejected(name, output, f"its modulation rows {part.terminal.name} overlap rows used by {_describe(clash)}")
    if kappa_index is not None and len(factor.users) != 1:
        other = next(u for u in factor.users if u is not mul)
        return _Rejected(name, output, f"its factor {factor.name} also feeds {_describe(other)}")
    if shift is not None and scale.rows.numel() != shift.rows.numel():
        return _Rejected(name, output, "its scale and shift have different channel counts")
    return AdaLNSource(gm, mul, factor, kappa_index, scale, shift, output)


# -- regions --------------------------------------------------------------------------------------

@dataclass
class Region:
    """A source and the linears consuming its output: the unit a channel transform folds into."""

    source: Source
    sinks: list[fx.Node]

    @property
    def input(self) -> fx.Node:
        """The tensor between source and sinks: the sinks' input."""
        return self.source.output

    @property
    def channels(self) -> int:
        return self.source.channels

    @property
    def sink_sites(self) -> list[str]:
        return [n.meta["site"] for n in self.sinks]

    @property
    def name(self) -> str:
        return f"{self.source.name} -> {'+'.join(self.sink_sites)}"

    def sink_weights(self, gm: fx.GraphModule) -> torch.Tensor:
        """The sinks' weights stacked along the output axis, ``[sum of outputs, C]``: the rows
        all multiply the same input, so they are one weight for every formula over columns."""
        return torch.cat([get_attr(gm, n.args[1].target).detach() for n in self.sinks], 0)

    def fold(self, gm: fx.GraphModule, *, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> None:
        """Make the sinks' input ``(y - shift) / scale`` with the sinks' outputs unchanged."""
        scale = None if scale is None else scale.double()
        shift = None if shift is None else shift.double()
        for sink in self.sinks:  # sinks first: b + W p uses the unscaled W
            w_target = sink.args[1].target
            w = get_attr(gm, w_target).detach().double()
            if shift is not None:
                b_target = _ensure_linear_bias(gm, sink)
                _assign(gm, b_target, get_attr(gm, b_target).double() + w @ shift)
            if scale is not None:
                _assign(gm, w_target, w * scale)
        self.source.fold(gm, scale, shift)


def _sources(gm: fx.GraphModule, ctx: PassContext) -> list[Source | _Rejected]:
    """Every source in the graph, and the sources that cannot fold (with the reason)."""
    found: list = list(RMSNormSource.find(gm))
    mods = None
    candidates = _modulation_candidates(gm)
    if candidates:
        inputs = ctx.probe_inputs if ctx.probe_inputs is not None else (ctx.calib_inputs[0] if ctx.calib_inputs else None)
        if inputs is None:
            _note(ctx, "AdaLN modulation not analysed: no probe or calibration batch to trace its rows with")
        else:
            mods = _ModulationRows(gm, inputs, candidates)
    for node in gm.graph.nodes:
        src = LayerNormSource.match(gm, node) or LinearSource.match(gm, node)
        if src is None and mods is not None and is_mul(node):
            src = _match_adaln(gm, node, mods)
        if src is not None:
            found.append(src)
    return found


def _shared_tensors(gm: fx.GraphModule) -> set[str]:
    """Targets of parameters/buffers whose storage another target also uses (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        owners.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def _note(ctx: PassContext, text: str) -> None:
    """Add a finding to ctx.notes once, however many passes find it."""
    if text not in ctx.notes:
        ctx.notes.append(text)


def find_regions(gm: fx.GraphModule, ctx: PassContext) -> list[Region]:
    """The foldable regions of ``gm`` in graph order; each rejection is noted once in ctx.notes."""
    shared = _shared_tensors(gm)
    attr_users: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr_users[n.target] = attr_users.get(n.target, 0) + len(n.users)
    regions: list[Region] = []

    def reject(source_name: str, sinks: list[fx.Node], reason: str) -> None:
        _note(ctx, f"{source_name}: cannot fold into {', '.join(s.meta['site'] for s in sinks)}: {reason}")

    for src in _sources(gm, ctx):
        name, output = src.name, src.output
        users = [u for u in output.users if not _is_metadata_use(u)]
        sinks = [u for u in users if is_linear(u) and "site" in u.meta and u.args[0] is output
                 and output not in u.args[1:] and u.args[1].op == "get_attr"]
        if not sinks:
            continue
        others = [u for u in users if u not in sinks]
        if isinstance(src, _Rejected):
            reject(name, sinks, src.reason)
        elif others:
            reject(name, sinks, f"output also feeds {_describe(others[0])}")
        elif any(get_attr(gm, s.args[1].target).shape[1] != src.channels for s in sinks):
            reject(name, sinks, f"channel count {src.channels} differs from the sinks' input features")
        elif tied := [t for t in src.tensors() + [s.args[1].target for s in sinks]
                      if t in shared or attr_users.get(t, 0) > 1]:
            reject(name, sinks, f"{tied[0]} is shared with another part of the model")
        else:
            regions.append(Region(src, sinks))
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(regions, key=lambda r: order[r.input])


class FoldedObserver(TensorObserver):
    """Statistics of ``(x - p) / s`` derived from an observer of ``x``, without a calibration run.

    Per-channel min and max, and per-group per-channel min and max, map exactly (``s > 0``);
    the sum of squares maps under a pure scale (``/ s^2``) and is unknown (None) after a shift,
    which would need the per-channel sum. The per-tensor histograms cannot follow a
    per-channel transform, so the percentile searches refuse until ``observe`` runs again.
    """

    folded_by = ""

    @classmethod
    def of(cls, obs: TensorObserver, scale: torch.Tensor | None, shift: torch.Tensor | None, by: str) -> FoldedObserver:
        new = cls(obs.name, obs.bins, histograms=False)
        new.folded_by = ", ".join(filter(None, (getattr(obs, "folded_by", ""), by)))
        new.count, new.batches, new.grouped, new.group_count = obs.count, obs.batches, obs.grouped, obs.group_count
        new.min, new.max = (_scale_shift(t, scale, shift).float() for t in (obs.min, obs.max))
        if obs.grouped:
            new.group_min, new.group_max = (_scale_shift(t, scale, shift).float() for t in (obs.group_min, obs.group_max))
        if shift is None and obs.sumsq is not None:
            new.sumsq = obs.sumsq.double() / (1.0 if scale is None else scale.double().pow(2))
        return new

    def _refuse(self):
        raise UserError(f"{self.name}: the statistics were folded per channel (by {self.folded_by}) after 'observe'; "
                        f"percentile searches need fresh histograms: run 'observe' again before this pass")

    def quantile(self, q: float, group: int | None = None) -> float:
        self._refuse()

    def search_range(self, bits: int, symmetric: bool, candidates: tuple[float, ...] = (), group: int | None = None):
        self._refuse()


# -- passes ---------------------------------------------------------------------------------------

def _rounded(values: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in values.tolist()]


@register
class FindRegions(Pass):
    """Analysis only: list the scale-folding regions and note the rejected ones (ctx.notes)."""

    name = "find-regions"
    preserves_numerics = True

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        regions = find_regions(gm, ctx)
        table = [{"source": r.source.name, "kind": r.source.kind, "sinks": r.sink_sites, "channels": r.channels}
                 for r in regions]
        return PassResult(gm, False, {"regions": len(regions), "table": table})


class FoldingPass(Pass):
    """Template of the passes that fold a per-channel ``(y - p) / s`` into every region.

    Subclasses compute ``(scale, shift)`` for one region (``plan``) from the graph as the pass
    found it: all regions are planned first, then folded, so the order of regions never
    changes a result. Each fold replaces the region's observer by a ``FoldedObserver`` (min
    and max stay exact, so a second folding pass needs no new calibration run) and records
    the vector in ``ctx.stats[<sink>][stat_key]`` and in the pass stats.
    """

    preserves_numerics = True
    stat_key: ClassVar[str] = ""
    folds_shift: ClassVar[bool] = False

    def prepare(self, gm: fx.GraphModule, ctx: PassContext, regions: list[Region]) -> Any:
        """Work shared by all regions (validation, a calibration run); passed to ``plan``."""
        return None

    @abc.abstractmethod
    def plan(self, gm: fx.GraphModule, ctx: PassContext, region: Region,
             shared: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(scale, shift)`` for one region, float64 ``[C]`` or None; both None skips it."""

    def input_stats(self, ctx: PassContext, region: Region) -> TensorObserver:
        site = region.sink_sites[0]
        obs = ctx.stats.get(site, {}).get("input")
        if not isinstance(obs, TensorObserver) or obs.min is None:
            raise UserError(f"{self.name}: no activation statistics for {site}: run 'observe' before '{self.name}'")
        if obs.channels != region.channels:
            raise UserError(f"{self.name}: statistics of {site} have {obs.channels} channels, the region has "
                            f"{region.channels}: re-run 'observe' after passes that change the graph")
        return obs

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        regions = []
        for region in find_regions(gm, ctx):
            if all(s in ctx.sites and ctx.sites[s].excluded_by for s in region.sink_sites):
                continue
            if self.folds_shift and (why := region.source.shift_blocker()):
                _note(ctx, f"{region.source.name}: cannot fold a shift into {', '.join(region.sink_sites)}: {why}")
                continue
            regions.append(region)
        shared = self.prepare(gm, ctx, regions)
        plans = [(region, *self.plan(gm, ctx, region, shared)) for region in regions]
        plans = [p for p in plans if p[1] is not None or p[2] is not None]
        vectors = {}
        for region, scale, shift in plans:
            region.fold(gm, scale=scale, shift=shift)
            vector = (scale if scale is not None else shift).float()
            vectors[region.name] = _rounded(vector)
            for site in region.sink_sites:
                stats = ctx.stats.setdefault(site, {})
                stats[self.stat_key] = vector
                if isinstance(stats.get("input"), TensorObserver) and stats["input"].min is not None:
                    stats["input"] = FoldedObserver.of(stats["input"], scale, shift, self.name)
        gm.graph.lint()
        gm.recompile()
        summary = {"regions": len(plans)}
        if vectors:
            flat = torch.tensor([v for vs in vectors.values() for v in vs])
            summary["range"] = f"{float(flat.min()):.4g}..{float(flat.max()):.4g}"
        summary[self.stat_key] = vectors
        return PassResult(gm, bool(plans), summary)
