"""``omniquant``: learned weight clipping + learned equivalent transformation (OmniQuant, Shao et al. 2024).

A PTQ4ARVG baseline (issue 19). Two sets of variables, learned per block (``passes/block_recon.py``)
on the calibration set so that the block with quantized weights and activations reproduces the
float block's outputs (squared error, Adam, ``iters`` steps on batches drawn from the first
``batches``):

LET, per scale-folding region (a norm / AdaLN / linear source and the linears reading its output,
``passes/regions.py``): a channel scale ``s`` and shift ``p``. The sinks see ``(y - p) / s`` and
compute ``(W·diag(s)) x + (b + W p)``: the same function in FP. Initialised as OmniQuant does: ``p``
the midpoint of the observed channel range, ``s = a^0.5 / max_o |W_oc|^0.5`` with ``a`` the
half-range after the shift (SmoothQuant's formula). After learning, ``(s, p)`` is folded into the
source and the sinks exactly like ``os-plus`` (a ``FoldingPass``; the manager checks FP outputs).

LWC, per output channel of every quantized linear: ``gamma``, the clipping ratio
``sigmoid(gamma)`` of the row's range (symmetric: ``scale = sigmoid(gamma) max|W'_o| / qmax``;
``symmetric=false``: ``sigmoid(gamma) max W'_o`` and ``sigmoid(beta) min W'_o``), initialised at
``sigmoid(4) = 0.982`` as OmniQuant's ``lwc`` is. The learned grids become the weights' decisions in
``ctx.qparams`` (``insert-qdq`` uses them; no ``weight-quant`` after this pass).

During learning, rounding is a straight-through estimator, and each sink's input is fake-quantized
per tensor from its live range at the activation bits (the static grids themselves are decided
after the fold by ``observe``, ``act-quant``). Linears outside every region (the FC after GELU,
the attention projection) learn LWC only. Attention matmuls stay in float during learning.
Blocks are learned from the float model's inputs, all before any fold, so the region order and
the block order never change a result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core import qmath
from core.errors import UserError
from core.qmath import QParams
from passes.block_recon import block_of, capture, extract, frozen_parameters, group_by_block, output_loss
from passes.canonicalize import is_linear
from passes.infra import PassContext, get_attr, register
from passes.quantize import act_bits, weight_bits
from passes.regions import FoldingPass, Region

LWC_INIT = 4.0  # OmniQuant's init_value: sigmoid(4) = 0.982 of the range kept


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def act_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor fake quantization from the live range, straight-through."""
    _, qmax = qmath.qrange(bits)
    scale = (x.detach().abs().amax() / qmax).clamp(min=1e-8)
    return torch.clamp(_round_ste(x / scale), -qmax - 1, qmax) * scale


def let_init(lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """OmniQuant's LET start: shift = channel midpoint, scale = SmoothQuant's on the shifted half-range."""
    shift = (hi + lo) / 2
    half = ((hi - lo) / 2).clamp(min=1e-5)
    w_max = w.abs().amax(0).clamp(min=1e-5)
    return (half.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5), shift


class LWC(nn.Module):
    """Learned clipping of one weight's rows (or, with ``group``, of each group of ``group`` input
    channels of a row: ``--bits W4A4``); ``qparams(w)`` and ``forward(w)`` (fake-quantized)."""

    def __init__(self, rows: int, bits: int, symmetric: bool, device, group: int = 0):
        super().__init__()
        self.bits, self.symmetric, self.group = bits, symmetric, group
        self.gamma = nn.Parameter(torch.full((rows,), LWC_INIT, device=device))
        self.beta = nn.Parameter(torch.full((rows,), LWC_INIT, device=device)) if not symmetric else None

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per row ``[out]``, or per group ``[out, in / group]``."""
        if self.group:
            scale, zp = self._qparams(w.reshape(-1, self.group))
            return scale.reshape(w.shape[0], -1), zp.reshape(w.shape[0], -1)
        return self._qparams(w)

    def _qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = qmath.qrange(self.bits)
        if self.symmetric:
            scale = (torch.sigmoid(self.gamma) * w.abs().amax(1) / qmax).clamp(min=1e-8)
            return scale, torch.zeros_like(scale)
        hi = torch.sigmoid(self.gamma) * w.amax(1).clamp(min=0)
        lo = torch.sigmoid(self.beta) * w.amin(1).clamp(max=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
        return scale, torch.round(qmin - lo / scale).detach()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qmath.qrange(self.bits)
        scale, zp = self.qparams(w)
        s, z = qmath.broadcast_like(scale, w, 1) if self.group else scale[:, None], \
            qmath.broadcast_like(zp, w, 1) if self.group else zp[:, None]
        return (torch.clamp(_round_ste(w / s) + z, qmin, qmax) - z) * s


class LET(nn.Module):
    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.float().clone())
        self.shift = nn.Parameter(shift.float().clone())

    def safe_scale(self) -> torch.Tensor:
        return self.scale.clamp(min=1e-5)


class _Sink(nn.Module):
    """A linear of the block during learning: LET on its input and weight, LWC, input fake-quant."""

    def __init__(self, let: LET | None, lwc: LWC, a_bits: int):
        super().__init__()
        self.let, self.lwc, self.a_bits = let, lwc, a_bits

    def forward(self, x, w, b=None):
        if self.let is not None:
            s, p = self.let.safe_scale(), self.let.shift
            b = (b if b is not None else 0) + w @ p
            x, w = (x - p) / s, w * s
        return F.linear(act_fake_quant(x, self.a_bits), self.lwc(w), b)


def _merge_shared(blocks: dict[str, list[str]], regions: list[Region]) -> dict[str, list[str]]:
    """Blocks joined where one region's sinks fall in several (a model without numbered blocks:
    SwiGLU's w1 and w3 share one LET and must learn it together); sites keep their order."""
    where = {s: name for name, members in blocks.items() for s in members}
    for region in regions:
        names = list(dict.fromkeys(where[s] for s in region.sink_sites if s in where))
        for other in names[1:]:
            for s in blocks.pop(other):
                blocks[names[0]].append(s)
                where[s] = names[0]
    return {"+".join(dict.fromkeys(block_of(s) for s in members)): members for members in blocks.values()}


@register
class OmniQuant(FoldingPass):
    """Options: ``iters`` per block, ``batches`` kept, ``let_lr`` / ``lwc_lr`` (OmniQuant's 5e-3,
    1e-2), ``alpha`` of the LET start, ``bits`` / ``w_bits`` (0: the compilation's), ``symmetric``
    weights (TensorRT's), ``seed``, ``compensate`` (``passes/regions.py``)."""

    name = "omniquant"
    stat_key = "omniquant_scale"
    folds_shift = True
    iters: int = 100
    batches: int = 8
    let_lr: float = 5e-3
    lwc_lr: float = 1e-2
    alpha: float = 0.5
    bits: int = 0
    w_bits: int = 0
    symmetric: bool = True
    seed: int = 0
    compensate: bool = False

    def prepare(self, gm, ctx: PassContext, regions: list[Region]) -> dict:
        if self.iters < 0 or self.batches < 1:
            raise UserError(f"omniquant: iters must be >= 0 and batches >= 1, got {self.iters}, {self.batches}")
        a_bits, w_bits = act_bits(self.bits, ctx), weight_bits(self.w_bits, ctx)
        sites = [n.meta["site"] for n in gm.graph.nodes if is_linear(n) and n.meta.get("site") in ctx.sites
                 and not ctx.sites[n.meta["site"]].excluded_by]
        if not sites:
            raise UserError("omniquant: no linear site to quantize: run 'canonicalize' first")
        lets: dict[str, LET] = {}  # sink site -> its region's LET (sinks of one region share it)
        for region in regions:
            obs = self.input_stats(ctx, region)
            scale, shift = let_init(obs.min.double(), obs.max.double(), region.sink_weights(gm).double(), self.alpha)
            let = LET(scale, shift).to(get_attr(gm, region.sinks[0].args[1].target).device)
            for s in region.sink_sites:
                lets[s] = let
        weight_of = {n.meta["site"]: n.args[1].target for n in gm.graph.nodes
                     if n.meta.get("site") in sites and getattr(n.args[1], "op", None) == "get_attr"}
        group = ctx.config.precision.groups(w_bits)
        lwcs = {}
        for s, t in weight_of.items():
            out, width = get_attr(gm, t).shape
            size = qmath.group_size(width, group) if group else 0
            lwcs[s] = LWC(out * (width // size if size else 1), w_bits, self.symmetric, get_attr(gm, t).device, size)
        generator = torch.Generator().manual_seed(self.seed)
        losses = {}
        with frozen_parameters(gm):
            for name, members in _merge_shared(group_by_block(sites), regions).items():
                losses[name] = self._learn(gm, ctx, name, members, lets, lwcs, a_bits, generator)
        self._learned = {"lwcs": lwcs, "weight_of": weight_of, "losses": losses, "w_bits": w_bits}
        return {"lets": lets}

    def _learn(self, gm, ctx, name, members, lets, lwcs, a_bits, generator) -> dict:
        block = extract(gm, name, members)
        data = capture(gm, ctx, block, self.batches)
        weights = [get_attr(gm, t).detach().clone() for t in block.weights]
        with torch.no_grad():
            targets = [block.run(x, weights) for x in data]
        g = block.module.graph
        for node in list(g.nodes):
            if is_linear(node) and node.meta.get("site") in block.sites:
                site = node.meta["site"]
                sub = f"omniquant_{site.replace('.', '_')}"
                block.module.add_module(sub, _Sink(lets.get(site), lwcs[site], a_bits))
                with g.inserting_before(node):
                    new = g.call_module(sub, tuple(node.args[:3]) + tuple(node.kwargs.values()))
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                g.erase_node(node)
        block.module.recompile()
        params = list(dict.fromkeys(p for m in block.module.modules() if isinstance(m, (LET, LWC)) for p in m.parameters()))
        let_params = [p for m in block.module.modules() if isinstance(m, LET) for p in m.parameters()]
        lwc_params = [p for p in params if all(p is not q for q in let_params)]
        groups = [{"params": lwc_params, "lr": self.lwc_lr}]
        if let_params:
            groups.append({"params": list(dict.fromkeys(let_params)), "lr": self.let_lr})

        def err() -> float:
            with torch.no_grad():
                return sum(float(output_loss(block.run(x, weights), t)) for x, t in zip(data, targets)) / len(data)

        before = err()
        start = [p.detach().clone() for p in params]
        if self.iters:
            opt = torch.optim.Adam(groups)
            for _ in ctx.progress(range(self.iters), desc=f"omniquant {name}", unit="it"):
                i = int(torch.randint(len(data), (1,), generator=generator, device="cpu"))  # a CPU draw under any default device
                loss = output_loss(block.run(data[i], weights), targets[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        after = err()
        if after > before:  # learning on a few batches can overshoot (seen on a GPU): keep the start instead
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            after = err()
        return {"sites": block.sites, "initial_err": before, "learned_err": after, "kept_initial": after == before}

    def plan(self, gm, ctx: PassContext, region: Region, shared: dict):
        let = shared["lets"][region.sink_sites[0]]
        return let.safe_scale().detach().double(), let.shift.detach().double()

    def __call__(self, gm, ctx: PassContext):
        result = super().__call__(gm, ctx)  # learns (prepare), then folds every region's LET
        learned, self._learned = self._learned, None
        # the weights' grids from the folded weights (a linear may be a sink, W·diag(s), and a source,
        # rows / s': the clipping ratio is per row or per group of a row, so either scaling keeps it)
        for site, lwc in learned["lwcs"].items():
            w = get_attr(gm, learned["weight_of"][site]).detach().float()
            with torch.no_grad():
                scale, zp = lwc.qparams(w)
            ctx.qparams[f"{site}.weight"] = QParams(scale.detach().clone(), zp.detach().to(torch.int8), learned["w_bits"],
                                                    self.symmetric, *(("block", 1) if lwc.group else ("channel", 0)))
            ctx.stats.setdefault(site, {})["omniquant_clip"] = torch.sigmoid(lwc.gamma.detach()).float()
        result.stats["blocks"] = learned["losses"]
        result.stats["weights"] = len(learned["lwcs"])
        return result
