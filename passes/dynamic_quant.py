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
"""
from __future__ import annotations

from torch import fx

from core.errors import UserError
from passes import ops
from passes.canonicalize import is_linear
from passes.infra import Pass, PassContext, PassResult, register
from passes.quantize import act_bits

SIMULATION_ONLY = "simulation_only"  # node meta key: why a node cannot be exported (none of this pass's)


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

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        bits = act_bits(self.bits, ctx)
        if self.granularity not in ("token", "tensor"):
            raise UserError(f"dynamic-act-quant: granularity must be token or tensor, got {self.granularity!r}")
        if self.granularity == "tensor" and (bits != 8 or self.symmetric):
            raise UserError(f"dynamic-act-quant{{granularity=tensor}} is ONNX DynamicQuantizeLinear (uint8, asymmetric): "
                            f"it needs 8 bits and symmetric=false, got {bits} bits, symmetric={str(self.symmetric).lower()}")
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
                fq = (g.call_function(ops.DYNAMIC_TOKEN_FQ, (node.args[0], bits, self.symmetric))
                      if self.granularity == "token" else g.call_function(ops.DYNAMIC_TENSOR_FQ_U8, (node.args[0],)))
            fq.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
            node.args = (fq, *node.args[1:])
            done.append(site)
        g.lint()
        gm.recompile()
        return PassResult(gm, bool(done), {"activations": len(done), "skipped": skipped, "bits": bits,
                                           "symmetric": self.symmetric, "granularity": self.granularity})
