"""RepQ-ViT (Li et al., 2023), a PTQ4ARVG baseline (issue 19): ``repq-reparam`` and ``log2-softmax``.

``repq-reparam``: scale reparameterisation of post-LayerNorm activations. Calibrate an asymmetric
per-channel grid ``(s_c, z_c)`` on the norm's output (min-max of the observed range), then make it
one per-tensor grid ``s~ = mean(s_c)``, ``z~ = round(mean(z_c))`` by folding, per channel::

    r_c = s_c / s~,   p_c = -s_c (z_c - z~)        x' = (x - p) / r   (into the norm / AdaLN affine)
    W' = W diag(r),   b' = b + W p                                      (into the next linears)

so that ``round(x'_c / s~) + z~ = round(x_c / s_c) + z_c``: per-tensor quantization of ``x'`` is
per-channel quantization of ``x``, code for code (``z_c - z~`` is an integer), and the FP model is
unchanged. The per-tensor grid is decided here (``ctx.qparams[<sink>.input]``, asymmetric: insert-qdq
lowers its zero point into the GEMM's epilogue, TensorRT-legal). Only norm sources (LayerNorm,
RMSNorm, AdaLN) are reparameterised, as in RepQ-ViT; linear -> linear regions are left alone.
Not replicated: RepQ-ViT's percentile search of the per-channel ranges (min-max here).

``log2-softmax``: RepQ-ViT's log-sqrt(2) quantizer (``ops.log_sqrt2_fake_quant``) for attention
probabilities. Our graphs quantize them only where an attention matmul is a site whose first operand
is a softmax (VAR, LlamaGen, RAR, PAR write attention as matmul -> softmax -> matmul; a fused SDPA
has no probabilities in the graph, and the pass then notes that it found none). It replaces the
uniform grid that ``act-quant{matmuls=true}`` gave that operand; ``delta`` is the largest observed
probability. ONNX runs it as float arithmetic; TensorRT has no log-domain INT8 GEMM, so it runs
``attn @ V`` in float (the Q/DQ lint's ``gemm-fusion`` finding when V is still quantized).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from calib.observers import TensorObserver
from core import qmath
from core.qmath import QParams
from passes import ops
from passes.infra import Pass, PassContext, PassResult, register, set_buffer
from passes.quantize import act_bits
from passes.regions import FoldingPass, Region

NORM_KINDS = ("layernorm", "rmsnorm", "adaln")


def repq_transform(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, QParams]:
    """``(r, p, per-tensor QParams)`` from per-channel min/max: the module docstring's formulas."""
    s, z = qmath.qparams_from_range(lo, hi, bits, symmetric=False)
    s, z = s.double(), z.double()
    s_t, z_t = s.mean(), torch.round(z.mean())
    grid = QParams(s_t.float().reshape(()), z_t.to(torch.int8).reshape(()), bits, False, "tensor", 0)
    return s / s_t, -s * (z - z_t), grid


@register
class RepQReparam(FoldingPass):
    """Options: ``bits`` of the activation grid (0: the compilation's); ``compensate`` (``passes/regions.py``)."""

    name = "repq-reparam"
    stat_key = "repq_scale"
    folds_shift = True
    bits: int = 0
    compensate: bool = False

    def plan(self, gm, ctx: PassContext, region: Region, shared=None):
        if region.source.kind not in NORM_KINDS:
            return None, None
        obs = self.input_stats(ctx, region)
        scale, shift, grid = repq_transform(obs.min, obs.max, act_bits(self.bits, ctx))
        for site in region.sink_sites:
            if not ctx.sites[site].excluded_by:
                ctx.qparams[f"{site}.input"] = grid
            ctx.stats.setdefault(site, {})["repq_shift"] = shift.float()
        return scale, shift


_SOFTMAX = {F.softmax, torch.softmax, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int}


def _is_softmax(node) -> bool:
    return (node.op == "call_method" and node.target == "softmax") or (node.op == "call_function" and node.target in _SOFTMAX)


@register
class Log2Softmax(Pass):
    """Options: ``bits`` of the log grid (0: the compilation's activation bits)."""

    name = "log2-softmax"
    bits: int = 0

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        bits = act_bits(self.bits, ctx)
        g = gm.graph
        done = {}
        for node in list(g.nodes):
            site = node.meta.get("site")
            if site is None or site not in ctx.sites or ctx.sites[site].kind != "matmul" or ctx.sites[site].excluded_by:
                continue
            probs = node.args[0]
            if not _is_softmax(probs):
                continue
            obs = ctx.stats.get(site, {}).get("a")
            if not isinstance(obs, TensorObserver) or obs.max is None:
                continue  # not observed: nothing to calibrate delta on
            delta = float(obs.max.max().clamp(min=1e-8))
            ctx.qparams.pop(f"{site}.a", None)  # the log grid replaces the uniform one
            target = set_buffer(gm, f"{site}.a_log_delta", torch.tensor(delta))
            with g.inserting_before(node):
                fq = g.call_function(ops.LOG_SQRT2_FQ, (probs, g.get_attr(target), bits))
            fq.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
            node.replace_input_with(probs, fq)
            done[site] = round(delta, 6)
        if not done:
            note = "log2-softmax: no attention matmul site takes a softmax output (fused attention or none): nothing quantized"
            if note not in ctx.notes:
                ctx.notes.append(note)
        g.lint()
        gm.recompile()
        return PassResult(gm, bool(done), {"matmuls": len(done), "bits": bits, "delta": done})
