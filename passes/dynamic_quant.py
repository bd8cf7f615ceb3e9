"""``dynamic-act-quant``: dynamic per-token activation quantization (DTWQ), simulated in torch.

The STWQ ablation's baseline (PTQ4ARVG, method.md; issue 19): every quantized linear's input
gets a grid per token computed at run time from that token's own range::

    s_t, z_t = qparams_from_range(min_c x[t, c], max_c x[t, c])   (widened to contain 0)
    x'[t]    = (clamp(round(x[t] / s_t) + z_t, qmin, qmax) - z_t) * s_t

one ``arvgq::dynamic_token_fake_quant`` node before each linear (``passes/ops.py``). No
calibration is needed for the activations; weights keep ``weight-quant`` / ``insert-qdq``.
Sites that are excluded, or whose input an earlier pass already decided (``ctx.qparams``), are
left alone. The nodes carry ``meta["simulation_only"]``: the ONNX targets refuse the graph with
one line (``simulation_only_reason``) instead of exporting something TensorRT cannot run
(DynamicQuantizeLinear is unsigned, asymmetric and per tensor: it cannot express a per-token grid).
``--target torch`` keeps the fake-quant graph.
"""
from __future__ import annotations

from torch import fx

from passes import ops
from passes.canonicalize import is_linear
from passes.infra import Pass, PassContext, PassResult, register
from passes.quantize import act_bits

SIMULATION_ONLY = "simulation_only"  # node meta key: why this node cannot be exported


def simulation_only_reason(gm: fx.GraphModule) -> str | None:
    """The reason recorded by the first node that only runs in torch, or None."""
    for n in gm.graph.nodes:
        if n.meta.get(SIMULATION_ONLY):
            return n.meta[SIMULATION_ONLY]
    return None


@register
class DynamicActQuant(Pass):
    """Options: ``bits`` (0: the compilation's activation bits); ``symmetric`` grids per token."""

    name = "dynamic-act-quant"
    bits: int = 0
    symmetric: bool = True

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        bits = act_bits(self.bits, ctx)
        g = gm.graph
        done, skipped = [], 0
        for node in list(g.nodes):
            site = node.meta.get("site")
            if site is None or node.op != "call_function" or not is_linear(node) or site not in ctx.sites:
                continue
            if ctx.sites[site].excluded_by or f"{site}.input" in ctx.qparams:
                skipped += 1
                continue
            with g.inserting_before(node):
                fq = g.call_function(ops.DYNAMIC_TOKEN_FQ, (node.args[0], bits, self.symmetric))
            fq.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
            fq.meta[SIMULATION_ONLY] = (f"dtwq (dynamic-act-quant) is simulation-only: per-token scales are computed "
                                        f"at run time, which the ONNX Q/DQ graph cannot express (at {site}); "
                                        f"use --target torch")
            node.args = (fq, *node.args[1:])
            done.append(site)
        g.lint()
        gm.recompile()
        return PassResult(gm, bool(done), {"activations": len(done), "skipped": skipped, "bits": bits,
                                           "symmetric": self.symmetric})
