"""Blocks of a step graph for reconstruction passes (``brecq``, ``omniquant``).

A *block* is the set of graph nodes whose module path (``passes.infra.node_module``) lies under
one prefix: the path up to and including its first integer component that is not its last
(``blocks.3`` of ``blocks.3.attn.mat_qkv``), else its first component (``head``). Each quantized linear site
belongs to one block; a block's reconstruction target is every value the block hands to the rest
of the graph (the residual stream, and anything else computed inside it and read outside).

``extract`` copies a block's nodes into a standalone ``GraphModule`` sharing the parameters of
the step graph: its inputs are the values it reads from outside (placeholders, in graph order),
then, as extra placeholders, the weights of the sites being learned, so a pass can feed soft or
transformed weights in and differentiate through them. ``capture`` runs the current step graph
over calibration batches and keeps only a block's inputs (memory: one block's inputs of at most
``batches`` batches), stopping as soon as the block's last input is computed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from core.errors import UserError
from passes.infra import PassContext, node_module

_INDEX = re.compile(r"^\d+$")


def block_of(path: str) -> str:
    """``blocks.3.attn.mat_qkv`` -> ``blocks.3``; ``head.linear`` -> ``head``; an index that ends the
    path is a layer of a Sequential, not a block: ``block.ada_lin.1`` -> ``block``."""
    parts = path.split(".")
    for i, p in enumerate(parts[:-1]):
        if _INDEX.match(p):
            return ".".join(parts[: i + 1])
    return parts[0]


def _in_block(path: str | None, block: str) -> bool:
    """``block`` may join several with ``+`` (blocks learned together)."""
    return path is not None and any(path == b or path.startswith(b + ".") for b in block.split("+"))


@dataclass
class Block:
    name: str
    sites: list[str]  # linear sites to learn, in graph order
    module: fx.GraphModule  # inputs: external values, then one weight per site
    inputs: list[fx.Node]  # the step graph's nodes the block reads, in placeholder order
    outputs: list[fx.Node]  # the step graph's nodes the block hands on
    weights: list[str]  # get_attr targets of the sites' weights, in placeholder order

    def run(self, inputs: tuple, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """The block's outputs that are floating tensors (the reconstruction target)."""
        out = self.module(*inputs, *weights)
        return [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point()]


def group_by_block(sites: list[str]) -> dict[str, list[str]]:
    """Block name -> its sites, in the order of ``sites`` (graph order)."""
    blocks: dict[str, list[str]] = {}
    for s in sites:
        blocks.setdefault(block_of(s), []).append(s)
    return blocks


def extract(gm: fx.GraphModule, block: str, sites: list[str]) -> Block:
    """The block's nodes as a standalone module (module docstring)."""
    site_nodes = {n.meta["site"]: n for n in gm.graph.nodes if n.meta.get("site") in sites}
    members = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
               and _in_block(node_module(n), block)]
    member_set = set(members)
    weight_nodes = {}
    for s in sites:
        w = site_nodes[s].args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            raise UserError(f"{s}: its weight is computed ({getattr(w, 'name', w)}), not a parameter; cannot reconstruct it")
        weight_nodes[w] = s
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []
    for n in members:  # external values first, in order of first use
        for a in n.all_input_nodes:
            if a in member_set or a in env or a in weight_nodes:
                continue
            if a.op == "get_attr":
                env[a] = g.get_attr(a.target)
            else:
                env[a] = g.placeholder(f"in_{len(inputs)}")
                inputs.append(a)
    for w in weight_nodes:
        env[w] = g.placeholder(f"w_{len(env)}")
    for n in members:  # an in-place op on an input would change the kept calibration data: copy it first
        first = n.args[0] if n.args else None
        if (n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__")
                and isinstance(first, fx.Node) and first in inputs and env[first].op == "placeholder"):
            with g.inserting_after(env[first]):
                env[first] = g.call_method("clone", (env[first],))
    for n in members:
        env[n] = g.node_copy(n, lambda a: env[a])
    outputs = [n for n in members if any(u not in member_set for u in n.users)]
    if not outputs:
        raise UserError(f"block {block}: nothing it computes is used outside it; cannot reconstruct it")
    g.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(gm, g)
    return Block(block, [s for s in sites if s in site_nodes], module, inputs, outputs,
                 [w.target for w in weight_nodes])


class _Stop(Exception):
    pass


class _Capture(fx.Interpreter):
    def __init__(self, gm, wanted: list[fx.Node]):
        super().__init__(gm)
        self.wanted = set(wanted)
        self.got: dict[fx.Node, object] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.got[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
            if len(self.got) == len(self.wanted):
                raise _Stop
        return out


def capture(gm: fx.GraphModule, ctx: PassContext, block: Block, batches: int) -> list[tuple]:
    """The block's inputs on the first ``batches`` calibration batches, from the current graph."""
    if not ctx.calib_inputs:
        raise UserError("block reconstruction needs calibration inputs (pass --calib-data FILE)")
    kept = []
    with torch.no_grad():
        for i in range(min(batches, len(ctx.calib_inputs))):
            cap = _Capture(gm, block.inputs)
            try:
                cap.run(*ctx.calib_inputs[i])
            except _Stop:
                pass
            kept.append(tuple(cap.got[n] for n in block.inputs))
    return kept


def output_loss(pred: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """BRECQ's ``lp_loss``: squared error summed over the last axis, averaged over the rest, per
    output, summed over outputs."""
    return sum((p.float() - t.float()).pow(2).sum(-1).mean() for p, t in zip(pred, target))


class frozen_parameters:
    """Context: every parameter of ``gm`` without ``requires_grad`` (only the pass's own variables
    get gradients), restored after."""

    def __init__(self, gm: torch.nn.Module):
        self.params = [p for p in gm.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
