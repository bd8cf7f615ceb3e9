"""Folding sources: ops whose per-channel output scale and shift are parameters a fold can edit
(LayerNorm, RMSNorm, AdaLN modulation, Linear), how each absorbs ``(y - p) / s`` (the table in
``passes/regions.py``), and the AdaLN analysis that finds which linear rows each modulation
channel comes from."""
from __future__ import annotations

import abc
import copy
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from core.errors import UserError
from core.qmath import scale_shift
from passes.canonicalize import is_linear
from passes.graph_match import (
    CAST_METHODS,
    LAYER_NORM_FNS,
    call_of,
    describe,
    is_add,
    is_move,
    is_mul,
    module_scopes,
)
from passes.infra import get_attr, set_buffer

# -- tensor edits -------------------------------------------------------------------------------

def assign(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
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


def ensure_linear_bias(gm: fx.GraphModule, linear: fx.Node) -> str:
    w_target = linear.args[1].target
    return _ensure_arg_tensor(gm, linear, 2, "bias", _bias_name(w_target), get_attr(gm, w_target)[:, 0])




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
        elif node.op == "call_function" and node.target in LAYER_NORM_FNS:
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
            assign(gm, self.weight, scale_shift(get_attr(gm, self.weight), scale, None))
        if bias is not None:
            assign(gm, bias, scale_shift(get_attr(gm, bias), scale, shift))


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
            for path, cls in module_scopes(node).items():
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
            assign(gm, self.weight, scale_shift(get_attr(gm, self.weight), scale, None))
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
        assign(gm, bias, scale_shift(get_attr(gm, bias), scale, shift))


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
        w[rows] = scale_shift(w[rows], scale[:, None], None).to(w.dtype)
        assign(gm, w_target, w)
    has_bias = len(lin.args) > 2 and lin.args[2] is not None
    if has_bias or shift is not None:
        b_target = ensure_linear_bias(gm, lin)
        b = get_attr(gm, b_target).detach().clone()
        b[rows] = scale_shift(b[rows], scale, shift).to(b.dtype)
        assign(gm, b_target, b)


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
    while isinstance(node, fx.Node) and is_move(node):
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
        elif is_move(n) and n.args[0] in self.index:
            if call_of(n, set(), CAST_METHODS):
                self.index[n] = self.index[n.args[0]]
            else:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self.index.get(a, self.env.get(a)))
                self.index[n] = getattr(self, n.op)(n.target, args, kwargs)
        return out


class ModulationRows:
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


def modulation_candidates(gm: fx.GraphModule) -> set[fx.Node]:
    """Linears that may feed the scale or shift of ``n * (kappa + scale) + shift``."""
    found = set()
    for mul in filter(is_mul, gm.graph.nodes):
        terms = [split[1] for a in mul.args if (split := _kappa_split(a))]
        if (shift := _shift_add(mul)) is not None and _chain_root(shift[1]) is not None:
            terms += [shift[1], *mul.args]  # x * scale + shift, without kappa
        found |= {r for r in map(_chain_root, terms) if r is not None}
    return found


@dataclass
class Rejected:
    name: str
    output: fx.Node
    reason: str


def _adaln_name(scale: _Rows, shift: _Rows | None) -> str:
    lin = scale.linear.meta.get("site", scale.linear.name)
    return f"{lin}[scale {_span(scale.rows)}" + (f", shift {_span(shift.rows)}]" if shift else "]")


def match_adaln(gm, mul: fx.Node, mods: ModulationRows) -> AdaLNSource | Rejected | None:
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
            return Rejected(name, output, f"its modulation rows {part.terminal.name} also feed {describe(other)}")
        if (clash := mods.overlap(part)) is not None:
            return Rejected(name, output, f"its modulation rows {part.terminal.name} overlap rows used by {describe(clash)}")
    if kappa_index is not None and len(factor.users) != 1:
        other = next(u for u in factor.users if u is not mul)
        return Rejected(name, output, f"its factor {factor.name} also feeds {describe(other)}")
    if shift is not None and scale.rows.numel() != shift.rows.numel():
        return Rejected(name, output, "its scale and shift have different channel counts")
    return AdaLNSource(gm, mul, factor, kappa_index, scale, shift, output)
