"""``dynamic-act-quant``: dynamic per-token activation quantization (DTWQ), simulated in torch and exported to ONNX.

The STWQ ablation's baseline (PTQ4ARVG, method.md; issue 19): every quantized linear's input
gets a grid per token computed at run time from that token's own range::

    s_t, z_t = qparams_from_range(min_c x[t, c], max_c x[t, c])   (widened to contain 0)
    x'[t]    = (clamp(round(x[t] / s_t) + z_t, qmin, qmax) - z_t) * s_t

one ``arvgq::dynamic_token_fake_quant`` node before each linear (``passes/ops.py``). No
calibration is needed for the activations; weights keep ``weight-quant`` / ``insert-qdq``.
Sites that are excluded, or whose input an earlier pass already decided (``ctx.qparams``), are
left alone.

Export (ONNX targets): per token, ReduceMin/ReduceMax -> scale (and zero point) -> a per-row
QuantizeLinear/DequantizeLinear with those computed scales. ``granularity=tensor`` (8 bits,
``symmetric=false``) is ONNX's own ``DynamicQuantizeLinear`` (uint8, asymmetric, one grid per
tensor) followed by DequantizeLinear. TensorRT takes neither (its scales are build-time
constants; DynamicQuantizeLinear is not supported): ``backends/qdq_lint.py`` flags them
(``constant-scale``, ``forbidden-op``), and onnxruntime runs them.

Shift-and-Sum's activations (method.md §12.1) are options of the same pass: ``group`` (at 4 bits
or fewer, one grid per token and group of input channels; 0: the compilation's ``Precision.group``,
shrunk by ``qmath.group_size``), ``split`` (a glob of linears whose input gets separate scales for
its negative and positive parts: the FC after GELU) and ``matmuls`` (a glob of attention
``q @ k^T`` matmuls whose operands get per-token grids: q per row, k^T per column, i.e. per key).
These use ``arvgq::dynamic_group_fake_quant``, which has no ONNX form: its nodes carry
``meta["simulation_only"]`` and the ONNX targets refuse the graph with one line
(``simulation_only_reason``); ``--target torch`` keeps the fake-quant graph.
"""
from __future__ import annotations

import fnmatch

from torch import fx

from core import qmath
from core.errors import UserError
from passes import ops
from passes.canonicalize import is_linear
from passes.infra import Pass, PassContext, PassResult, register
from passes.quantize import act_bits
from passes.shift_sum import _unquantized

SIMULATION_ONLY = "simulation_only"  # node meta key: why a node cannot be exported


def simulation_only_reason(gm: fx.GraphModule) -> str | None:
    """The reason recorded by the first node that only runs in torch, or None."""
    for n in gm.graph.nodes:
        if n.meta.get(SIMULATION_ONLY):
            return n.meta[SIMULATION_ONLY]
    return None


@register
class DynamicActQuant(Pass):
    """Options: ``bits`` (0: the compilation's activation bits); ``symmetric`` grids;
    ``granularity``: ``token`` (a grid per token) or ``tensor`` (ONNX DynamicQuantizeLinear:
    8 bits, ``symmetric=false`` only)."""

    name = "dynamic-act-quant"
    bits: int = 0
    symmetric: bool = True
    granularity: str = "token"
    group: int = 0
    split: str = ""
    matmuls: str = ""

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        bits = act_bits(self.bits, ctx)
        if self.granularity not in ("token", "tensor"):
            raise UserError(f"dynamic-act-quant: granularity must be token or tensor, got {self.granularity!r}")
        if self.granularity == "tensor" and (bits != 8 or self.symmetric):
            raise UserError(f"dynamic-act-quant{{granularity=tensor}} is ONNX DynamicQuantizeLinear (uint8, asymmetric): "
                            f"it needs 8 bits and symmetric=false, got {bits} bits, symmetric={str(self.symmetric).lower()}")
        group = ctx.config.precision.groups(bits) and (self.group or ctx.config.precision.group)
        if self.granularity == "tensor" and (group or self.split or self.matmuls):
            raise UserError("dynamic-act-quant{granularity=tensor} is one grid per tensor: it takes no channel groups, "
                            "split or matmuls (those are per-token options)")
        g = gm.graph
        done, skipped, operands = [], 0, 0
        for node in list(g.nodes):
            site = node.meta.get("site")
            if site is None or node.op != "call_function" or site not in ctx.sites:
                continue
            if not is_linear(node):
                if self.matmuls and fnmatch.fnmatchcase(site, self.matmuls) and not ctx.sites[site].excluded_by:
                    a, b = (_unquantized(x)[0] for x in node.args[:2])
                    node.args = (self._fq(g, node, a, site, (bits, self.symmetric, 0, False, -1)),
                                 self._fq(g, node, b, site, (bits, self.symmetric, 0, False, -2)), *node.args[2:])
                    operands += 2
                continue
            if ctx.sites[site].excluded_by or f"{site}.input" in ctx.qparams:
                skipped += 1
                continue
            split = bool(self.split) and fnmatch.fnmatchcase(site, self.split)
            width = ctx.sites[site].in_features or 0
            size = qmath.group_size(width, group) if group and width else 0
            if size or split:
                fq = self._fq(g, node, node.args[0], site, (bits, self.symmetric, size, split, -1))
            else:  # DTWQ: exported as ONNX ops (module docstring)
                with g.inserting_before(node):
                    fq = (g.call_function(ops.DYNAMIC_TOKEN_FQ, (node.args[0], bits, self.symmetric))
                          if self.granularity == "token" else g.call_function(ops.DYNAMIC_TENSOR_FQ_U8, (node.args[0],)))
                fq.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
            node.args = (fq, *node.args[1:])
            done.append(site)
        if self.split and not any(fnmatch.fnmatchcase(s, self.split) for s in done):
            raise UserError(f"dynamic-act-quant: split={self.split!r} matches no quantized linear")
        if self.matmuls and not operands:
            raise UserError(f"dynamic-act-quant: matmuls={self.matmuls!r} matches no attention matmul")
        g.eliminate_dead_code()  # Q/DQ of matmul operands that the dynamic grids replaced
        g.lint()
        gm.recompile()
        return PassResult(gm, bool(done) or bool(operands), {
            "activations": len(done), "skipped": skipped, "bits": bits, "symmetric": self.symmetric,
            "granularity": self.granularity, **({"group": group} if group else {}), **({"split": self.split} if self.split else {}),
            **({"matmul_operands": operands} if self.matmuls else {})})

    @staticmethod
    def _fq(g: fx.Graph, node: fx.Node, value: fx.Node, site: str, args: tuple) -> fx.Node:
        """A grouped / split / per-key dynamic quantizer: simulation only (module docstring)."""
        with g.inserting_before(node):
            fq = g.call_function(ops.DYNAMIC_GROUP_FQ, (value, *args))
        fq.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
        fq.meta[SIMULATION_ONLY] = (f"dynamic-act-quant with channel groups, split signs or per-key grids is "
                                    f"simulation-only: ONNX has no per-group dynamic Q/DQ (at {site}); use --target torch")
        return fq


@register
class Log2Attention(Pass):
    """``log2-attn``: the attention probabilities (operand ``a`` of the ``sites`` matmuls, A of A @ V)
    get the per-row log2 quantizer of Shift-and-Sum (``ops.log2_fake_quant``), replacing any Q/DQ an
    earlier pass gave them. Simulation only, like ``dynamic-act-quant``. Options: ``bits`` (0: the
    compilation's activation bits), ``sites`` (a glob)."""

    name = "log2-attn"
    bits: int = 0
    sites: str = "*matmul2"

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        bits = act_bits(self.bits, ctx)
        g = gm.graph
        done = []
        for node in list(g.nodes):
            site = node.meta.get("site")
            if (site not in ctx.sites or ctx.sites[site].kind != "matmul" or ctx.sites[site].excluded_by
                    or not fnmatch.fnmatchcase(site, self.sites)):
                continue
            with g.inserting_before(node):
                fq = g.call_function(ops.LOG2_FQ, (_unquantized(node.args[0])[0], bits))
            fq.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
            fq.meta[SIMULATION_ONLY] = (f"log2-attn is simulation-only: its per-row log2 grid is computed at run time "
                                        f"and is not a Q/DQ pair (at {site}); use --target torch")
            node.args = (fq, *node.args[1:])
            done.append(site)
        if not done:
            raise UserError(f"log2-attn: no attention matmul matches {self.sites!r}: run canonicalize first, or set sites=")
        g.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, True, {"sites": done, "bits": bits})
