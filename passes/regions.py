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

Sinks are found on the output itself and through ops that only rearrange its other axes
(``contiguous``, a transpose or permute that keeps the last axis: ``nn.MultiheadAttention``
transposes batch-first inputs before its packed ``in_proj``).

A region is rejected, with the reason in ``ctx.notes``, when the source's output also feeds
something other than a linear's input (a residual add, an attention matmul...), when a tensor
it would edit is shared with another part of the model (tied weights), or when AdaLN
modulation rows are used elsewhere. Reading ``.shape``/``.size()`` of the output is harmless.

The first rejection is the rule of post-LN blocks (BERT, the original Transformer): the
LayerNorm's output is both the next linears' input and the residual, ``x = LN(x + f(x))``, so
scaling it would scale the residual too, and no parameter downstream can undo a per-channel
scale before the next LayerNorm mixes the channels. The passes' ``compensate=true`` folds such
a region anyway and restores the original tensor for the other consumers with one per-channel
multiply-add, ``y = y' * a + c`` (``torch.addcmul``; buffers ``<first sink>.input_restore_scale``
/ ``_shift``). That is exact in FP (two roundings), but it adds one pointwise op per region to
the deployed graph, which no other fold does; hence opt-in. Later folds into the same region
update the same multiply-add.

``FoldingPass`` is the template of the passes that fold (smooth, sym-shift, gps): find the
regions, compute one transform per region on the graph as found, fold them all, and keep the
observed statistics of the folded tensors exact where they can be (``FoldedObserver``).
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from calib.observers import FoldedObserver, TensorObserver
from core.errors import UserError
from passes.canonicalize import is_linear
from passes.fold_sources import (
    LayerNormSource,
    LinearSource,
    ModulationRows,
    Rejected,
    RMSNormSource,
    Source,
    assign,
    ensure_linear_bias,
    match_adaln,
    modulation_candidates,
)
from passes.graph_match import describe, is_metadata_use, is_mul, keeps_last_axis
from passes.infra import Pass, PassContext, PassResult, get_attr, register, set_buffer

RESTORE = "fold_restore"  # meta key of the multiply-add a compensated fold inserts

# -- regions --------------------------------------------------------------------------------------

@dataclass
class Region:
    """A source and the linears consuming its output: the unit a channel transform folds into."""

    source: Source
    sinks: list[fx.Node]
    others: list[tuple[fx.Node, fx.Node]] = dataclasses.field(default_factory=list)  # (tensor, non-linear consumer)

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
                b_target = ensure_linear_bias(gm, sink)
                assign(gm, b_target, get_attr(gm, b_target).double() + w @ shift)
            if scale is not None:
                assign(gm, w_target, w * scale)
        self.source.fold(gm, scale, shift)
        for tensor in dict.fromkeys(t for t, _ in self.others):
            self._restore(gm, tensor, [u for t, u in self.others if t is tensor], scale, shift)

    def _restore(self, gm: fx.GraphModule, tensor: fx.Node, users: list[fx.Node], scale, shift) -> None:
        """Give ``users`` the tensor as it was before the fold: ``y = y' * a + c`` with ``a <- s * a``,
        ``c <- p * a + c`` (one ``addcmul`` per tensor, created with ``a = 1, c = 0``)."""
        restore = next((u for u in users if u.meta.get(RESTORE)), None)
        if restore is None:
            base = f"{self.sink_sites[0]}.input_restore" + ("" if tensor is self.input else f"_{tensor.name}")
            device = get_attr(gm, self.sinks[0].args[1].target).device
            set_buffer(gm, f"{base}_scale", torch.ones(self.channels, device=device))
            set_buffer(gm, f"{base}_shift", torch.zeros(self.channels, device=device))
            g = gm.graph
            with g.inserting_after(tensor):
                a = g.get_attr(f"{base}_scale")
            with g.inserting_after(a):
                c = g.get_attr(f"{base}_shift")
            with g.inserting_after(c):
                restore = g.call_function(torch.addcmul, (c, tensor, a))
            for n in (a, c, restore):
                n.meta["nn_module_stack"] = dict(tensor.meta.get("nn_module_stack") or {})
            restore.meta[RESTORE] = True
        for u in users:
            if u is not restore:
                u.replace_input_with(tensor, restore)
        c_target, _, a_target = (n.target for n in restore.args)
        a, c = get_attr(gm, a_target).double(), get_attr(gm, c_target).double()
        assign(gm, a_target, a * (1.0 if scale is None else scale))
        assign(gm, c_target, c + (0.0 if shift is None else shift * a))


def _sources(gm: fx.GraphModule, ctx: PassContext) -> list[Source | Rejected]:
    """Every source in the graph, and the sources that cannot fold (with the reason)."""
    found: list = list(RMSNormSource.find(gm))
    mods = None
    candidates = modulation_candidates(gm)
    if candidates:
        inputs = ctx.probe_inputs if ctx.probe_inputs is not None else (ctx.calib_inputs[0] if ctx.calib_inputs else None)
        if inputs is None:
            _note(ctx, "AdaLN modulation not analysed: no probe or calibration batch to trace its rows with")
        else:
            mods = ModulationRows(gm, inputs, candidates)
    for node in gm.graph.nodes:
        src = LayerNormSource.match(gm, node) or LinearSource.match(gm, node)
        if src is None and mods is not None and is_mul(node):
            src = match_adaln(gm, node, mods)
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


def _consumers(output: fx.Node) -> tuple[list[fx.Node], list[tuple[fx.Node, fx.Node]]]:
    """The linears reading ``output`` as their input, directly or through ops that keep its last
    axis, and every other ``(tensor, consumer)`` edge that reads its values."""
    sinks, others, frontier = [], [], [output]
    for node in frontier:
        for u in node.users:
            if is_metadata_use(u):
                continue
            if (is_linear(u) and "site" in u.meta and u.args[0] is node and node not in u.args[1:]
                    and isinstance(u.args[1], fx.Node) and u.args[1].op == "get_attr"):
                sinks.append(u)
            elif keeps_last_axis(u, node) and u not in frontier:
                frontier.append(u)
            else:
                others.append((node, u))
    return sinks, others


def find_regions(gm: fx.GraphModule, ctx: PassContext, *, compensate: bool = False) -> list[Region]:
    """The foldable regions of ``gm`` in graph order; each rejection is noted once in ctx.notes.

    ``compensate``: a source whose output also feeds non-linear consumers is a region too; its
    fold restores their input (module docstring). A consumer restored by an earlier fold never
    blocks a region."""
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
        sinks, others = _consumers(output)
        if not sinks:
            continue
        blocking = [u for _, u in others if not u.meta.get(RESTORE)]
        if isinstance(src, Rejected):
            reject(name, sinks, src.reason)
        elif blocking and not compensate:
            reject(name, sinks, f"output also feeds {describe(blocking[0])}, which a fold would change "
                                f"(compensate=true folds it with a per-channel multiply-add restoring that input)")
        elif any(get_attr(gm, s.args[1].target).shape[1] != src.channels for s in sinks):
            reject(name, sinks, f"channel count {src.channels} differs from the sinks' input features")
        elif tied := [t for t in src.tensors() + [s.args[1].target for s in sinks]
                      if t in shared or attr_users.get(t, 0) > 1]:
            reject(name, sinks, f"{tied[0]} is shared with another part of the model")
        else:
            regions.append(Region(src, sinks, others))
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(regions, key=lambda r: order[r.input])


# -- passes ---------------------------------------------------------------------------------------

def _rounded(values: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in values.tolist()]


@register
class FindRegions(Pass):
    """Analysis only: list the scale-folding regions and note the rejected ones (ctx.notes)."""

    name = "find-regions"
    preserves_numerics = True
    compensate: bool = False

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        regions = find_regions(gm, ctx, compensate=self.compensate)
        table = [{"source": r.source.name, "kind": r.source.kind, "sinks": r.sink_sites, "channels": r.channels,
                  **({"restored": [u.name for _, u in r.others]} if r.others else {})} for r in regions]
        return PassResult(gm, False, {"regions": len(regions), "table": table})


class FoldingPass(Pass):
    """Template of the passes that fold a per-channel ``(y - p) / s`` into every region.

    Subclasses declare the option ``compensate: bool = False`` (fold regions whose source also
    feeds non-linear consumers, restoring their input: module docstring) and compute
    ``(scale, shift)`` for one region (``plan``) from the graph as the pass
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
        for region in find_regions(gm, ctx, compensate=getattr(self, "compensate", False)):
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
            restored = [describe(u) for _, u in region.others if not u.meta.get(RESTORE)]
            region.fold(gm, scale=scale, shift=shift)
            if restored:
                _note(ctx, f"{region.source.name}: folded into {', '.join(region.sink_sites)} with a per-channel "
                           f"multiply-add restoring the input of {', '.join(restored)} (compensate=true)")
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
