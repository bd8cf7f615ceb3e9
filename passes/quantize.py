"""Quantization decisions: which grid each activation and weight gets.

These passes only fill ``ctx.qparams`` (``<site>.input``, ``<site>.weight``, ``<site>.a``,
``<site>.b``); ``insert-qdq`` turns the decisions into graph nodes. Bit widths default to the
compilation's ``--bits`` (``ctx.config.precision``) when a pass option is 0.
"""
from __future__ import annotations

import fnmatch

import torch

from calib.observers import TensorObserver
from core import qmath
from core.errors import UserError
from core.qmath import QParams
from passes.infra import Pass, PassContext, PassResult, get_attr, register


def act_bits(option: int, ctx: PassContext) -> int:
    """A pass's activation bits: its own option, or the compilation's when the option is 0."""
    bits = option or ctx.config.precision.act
    qmath.qrange(bits)  # validates
    return bits


def weight_bits(option: int, ctx: PassContext) -> int:
    bits = option or ctx.config.precision.weight
    qmath.qrange(bits)
    return bits


@register
class ActQuant(Pass):
    """Static activation quantization from observed ranges (min-max).

    ``granularity=tensor`` is TensorRT-legal as is; ``channel`` is a simulation baseline
    (TensorRT accepts per-channel scales on weights only). ``matmuls`` also quantizes both
    operands of attention matmuls per tensor, those whose site matches the glob ``matmul_sites``
    (``*.matmul1``: q @ k^T only, the choice that keeps the MNIST VAR's tokens; the probabilities
    x V of ``*.matmul2`` lose 4 points, BENCHMARKS.md); without ``matmuls``, the sites the target asks for
    (``ctx.config.attention_sites``, set by ``tools.compile --target ort`` on a CPU with VNNI; ``--exclude``
    keeps them float). It fills in only what no earlier pass decided,
    so ``stwq,act-quant{matmuls=true}`` keeps the token-wise linears and adds the matmuls.
    At a 4-bit grid of a grouped precision (``--bits W4A4``), a linear's per-tensor grid becomes
    one grid per group of input channels (``Precision.group``, ``qmath.group_size``), stored per
    channel: exportable as a per-axis Q/DQ, but not TensorRT-legal (the lint says so).
    """

    name = "act-quant"
    bits: int = 0
    symmetric: bool = True
    granularity: str = "tensor"
    matmuls: bool = False
    matmul_sites: str = "*"

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if self.granularity not in ("tensor", "channel"):
            raise UserError(f"act-quant: granularity must be tensor or channel, got {self.granularity!r}")
        bits = act_bits(self.bits, ctx)
        glob = self.matmul_sites if self.matmuls else ctx.config.attention_sites
        matmuls = [n for n, s in ctx.sites.items() if s.kind == "matmul" and glob and fnmatch.fnmatchcase(n, glob)]
        if self.matmuls and self.matmul_sites != "*" and not matmuls:
            raise UserError(f"act-quant: matmul-sites={self.matmul_sites!r} matches no attention matmul")
        decided = 0
        for name, site in ctx.sites.items():
            if site.excluded_by or (site.kind == "matmul" and name not in matmuls):
                continue
            for role, obs in ctx.stats.get(name, {}).items():
                if not isinstance(obs, TensorObserver):  # fold records: smooth_scale, sym_shift, gps_scale
                    continue
                if obs.min is None or f"{name}.{role}" in ctx.qparams:  # decided by an earlier pass (stwq)
                    continue
                group = site.kind == "linear" and ctx.config.precision.groups(bits)
                if group and self.granularity == "tensor":
                    # 4-bit groups of input channels (--bits W4A4): one range per group, stored per channel
                    # so the Q/DQ is the per-axis one (entries repeat within a group)
                    g = qmath.group_size(obs.min.numel(), group)
                    lo = obs.min.reshape(-1, g).amin(1).repeat_interleave(g)
                    hi = obs.max.reshape(-1, g).amax(1).repeat_interleave(g)
                    gran = "channel"
                elif self.granularity == "tensor" or site.kind == "matmul":
                    lo, hi, gran = obs.min.min(), obs.max.max(), "tensor"
                else:
                    lo, hi, gran = obs.min, obs.max, "channel"
                scale, zp = qmath.qparams_from_range(lo, hi, bits, self.symmetric)
                ctx.qparams[f"{name}.{role}"] = QParams(scale, zp, bits, self.symmetric, gran, -1 if gran == "channel" else 0)
                decided += 1
        if decided == 0 and not any(k.endswith((".input", ".a", ".b")) for k in ctx.qparams):
            if not ctx.sites:  # observe saw nothing because nothing was named
                raise UserError("act-quant found no quantization sites: 'canonicalize' names them and must run "
                                "first in the pipeline (is it disabled or missing?)")
            raise UserError("act-quant found no observed activations: run 'observe' before it in the pipeline")
        return PassResult(gm, False, {"activations": decided, "bits": bits, "attention_matmuls": len(matmuls)})


@register
class WeightQuant(Pass):
    """Per-output-channel weight quantization.

    ``symmetric=true`` is TensorRT's only weight format; ``symmetric=false`` is the reference
    code's (method.md §2.1), for accuracy studies (the QDQ lint flags its zero points).
    ``method=mse`` is the reference's range search, per output channel: among the percentiles
    ``PERCENTILES`` of the row (and 1-p for the minimum) it keeps the range whose
    quantize/dequantize MSE is lowest; weights are in memory, so this is exact.
    ``reduce_range=true`` (or ``ctx.config.weight_reduce_range``, set by ``tools.compile --target
    ort`` on a CPU without VNNI) caps weights at 7 bits, [-64, 63] stored in int8: onnxruntime's
    u8 x s8 kernels on x86 without VNNI saturate int16 pair sums with full-range weights.
    At 4 bits with a grouped precision (``--bits W4A6|W4A4``), each row gets one grid per group of
    input channels (granularity ``block``, scales ``[out, in / group]`` on axis 1).
    ``ctx.config.weight_format == "fp8"`` (``--target cuda-fp8``): the FP8 (E4M3) grid per output channel,
    ``amax / 448`` (``method=mse``: the range among amax and ``PERCENTILES`` with the lowest FP8 round-trip MSE).
    """

    name = "weight-quant"
    bits: int = 0
    symmetric: bool = True
    method: str = "minmax"  # minmax | mse
    reduce_range: bool = False

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if self.method not in ("minmax", "mse"):
            raise UserError(f"weight-quant: method must be minmax or mse, got {self.method!r}")
        bits = weight_bits(self.bits, ctx)
        fp8 = ctx.config.weight_format == "fp8"
        if fp8 and bits != 8:
            raise UserError(f"weight-quant: FP8 weights are 8-bit with a scale per output channel; --bits "
                            f"{ctx.config.precision.name} asks for {bits}-bit weights")
        if (self.reduce_range or ctx.config.weight_reduce_range) and not fp8:
            bits = min(bits, 7)
        decided = groups = 0
        for name, site in ctx.sites.items():
            if site.kind != "linear" or site.excluded_by:
                continue
            w = get_attr(gm, site.weight or f"{name}.weight").detach().float()
            if fp8:
                lo, hi = mse_row_ranges(w, bits, True, fp8=True) if self.method == "mse" else (w.amin(1), w.amax(1))
                ctx.qparams[f"{name}.weight"] = qmath.fp8_qparams(lo, hi)
                decided += 1
                continue
            group = ctx.config.precision.groups(bits) and qmath.group_size(w.shape[1], ctx.config.precision.group)
            rows = w.reshape(-1, group) if group else w  # group-wise: each group of a row is a row here
            lo, hi = mse_row_ranges(rows, bits, self.symmetric) if self.method == "mse" else (rows.amin(1), rows.amax(1))
            scale, zp = qmath.qparams_from_range(lo, hi, bits, self.symmetric)
            if group:  # blocked along the input axis: [out, in / group]
                ctx.qparams[f"{name}.weight"] = QParams(scale.reshape(w.shape[0], -1), zp.reshape(w.shape[0], -1),
                                                        bits, self.symmetric, "block", 1)
            else:
                ctx.qparams[f"{name}.weight"] = QParams(scale, zp, bits, self.symmetric, "channel", 0)
            groups = max(groups, group)
            decided += 1
        return PassResult(gm, False, {"weights": decided, "bits": bits, "method": self.method,
                                      **({"format": "fp8"} if fp8 else {}), **({"group": groups} if groups else {})})


PERCENTILES = (0.999, 0.9999, 0.99999)  # the reference's candidates (method.md §2.1)


def mse_row_ranges(w: torch.Tensor, bits: int, symmetric: bool, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w``, the percentile range with the lowest quantize/dequantize MSE (first on ties). On the FP8
    grid (symmetric) the full range is a candidate too, first: a float grid's relative step makes clipping pay less."""
    best_err = best_lo = best_hi = None
    for p in (1.0, *PERCENTILES) if fp8 else PERCENTILES:
        lo, hi = torch.quantile(w, 1 - p, dim=1), torch.quantile(w, p, dim=1)
        qp = qmath.fp8_qparams(lo, hi) if fp8 else QParams(*qmath.qparams_from_range(lo, hi, bits, symmetric), bits,
                                                           symmetric, "channel")
        back = qmath.dequantize(qmath.quantize_as(w, qp), qp.scale, qp.zero_point, 0)
        err = (back - w).pow(2).mean(1)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def quantized_weight(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """The codes of ``w`` on its grid (per tensor, per channel or blocked): int8, or float8_e4m3fn."""
    return qmath.quantize_as(w.detach().float(), qp)
