"""``brecq``: block-wise reconstruction with learned rounding (BRECQ, Li et al. 2021; AdaRound).

Runs after ``weight-quant`` (which fixes each linear's grid ``s, z``) and before ``insert-qdq``.
Per block (``passes/block_recon.py``: ``blocks.3``), each weight chooses, element by element,
whether it rounds down or up, to make the block's outputs on the calibration set match the block
with float weights. AdaRound's variables, as in BRECQ's ``AdaRoundQuantizer``::

    h(V)   = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)     zeta = 1.1, gamma = -0.1
    W~     = (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z) * s
    V_0    : h(V_0) = W / s - floor(W / s)                          (starts at the float weight)
    loss   = sum_outputs mean_rows ||block(x; W~) - block(x; W)||^2
           + weight * sum(1 - |2 h(V) - 1|^beta)                   (after the first warmup share)
    beta   : annealed linearly from 20 to 2 over the iterations after warmup

Adam on ``V``; at the end ``h = [V >= 0]``, and the float weight is replaced by the chosen grid
point, so ``insert-qdq`` stores exactly the learned integers (every one is floor or ceil of
``W / s``). Blocks run in graph order; each block's inputs come from the graph as it is then
(earlier blocks already rounded), and its target is the same block with float weights on those
inputs. Activations stay in float during reconstruction (BRECQ's first stage, weights only; the
static activation grids are the earlier ``act-quant`` / ``stwq`` decisions, taken on the float model).

Bounds: ``iters`` Adam steps per block (the paper 20000, Shift-and-Sum 5000: raise it for real
models), each on one calibration batch drawn at random from the first ``batches`` (the only
ones kept in memory, one block at a time). Runs on the device of the graph's weights, i.e. on the
GPU with ``--device cuda``. Progress: one bar per block through ``ctx.progress``.
"""
from __future__ import annotations

import torch

from core import qmath
from core.errors import UserError
from passes.block_recon import capture, extract, frozen_parameters, group_by_block, output_loss
from passes.infra import Pass, PassContext, PassResult, get_attr, register

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_rounding(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V) = W / s - floor(W / s)``."""
    rest = w / s - torch.floor(w / s)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def round_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def beta_at(it: int, iters: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """The annealed exponent at iteration ``it``, None during warmup (no rounding loss)."""
    first = int(warmup * iters)
    if it < first:
        return None
    return end + (start - end) * max(0.0, 1 - (it - first) / max(1, iters - first))


class _Rounded:
    """One weight's grid and rounding variables; ``soft()`` is differentiable, ``hard()`` final."""

    def __init__(self, w: torch.Tensor, qp: qmath.QParams):
        self.w = w.detach().float()
        self.s = qmath.broadcast_like(qp.scale.float().to(w.device), w, qp.axis)  # per channel or per group
        self.z = qmath.broadcast_like(qp.zero_point.float().to(w.device), w, qp.axis)
        self.qmin, self.qmax = qp.qmin, qp.qmax
        self.floor = torch.floor(self.w / self.s)
        self.v = init_rounding(self.w, self.s).requires_grad_(True)

    def _weight(self, h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(self.floor + h + self.z, self.qmin, self.qmax) - self.z) * self.s

    def soft(self) -> torch.Tensor:
        return self._weight(rectified_sigmoid(self.v))

    def hard(self) -> torch.Tensor:
        return self._weight((self.v >= 0).float()).detach()

    def nearest(self) -> torch.Tensor:
        return self._weight(torch.round(self.w / self.s) - self.floor)


@register
class Brecq(Pass):
    """Options: ``iters`` per block, ``batches`` kept per block, ``lr`` (Adam), ``weight`` of the
    rounding loss, ``warmup`` share of iterations without it, ``seed`` of the batch draws."""

    name = "brecq"
    iters: int = 200
    batches: int = 8
    lr: float = 1e-3
    weight: float = 0.01
    warmup: float = 0.2
    seed: int = 0

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if self.iters < 1 or self.batches < 1:
            raise UserError(f"brecq: iters and batches must be at least 1, got iters={self.iters}, batches={self.batches}")
        sites = [n.meta["site"] for n in gm.graph.nodes if n.meta.get("site") in ctx.sites
                 and f"{n.meta['site']}.weight" in ctx.qparams and ctx.sites[n.meta["site"]].kind == "linear"]
        if not sites:
            raise UserError("brecq: no linear has a weight grid: run 'weight-quant' before 'brecq'")
        if fp8 := [s for s in sites if ctx.qparams[f"{s}.weight"].fp8]:
            raise UserError(f"brecq: {fp8[0]} has an FP8 weight grid (--target cuda-fp8); brecq learns the rounding "
                            f"of integer grids: use --target cuda, or a recipe without brecq")
        generator = torch.Generator().manual_seed(self.seed)
        stats = {}
        with frozen_parameters(gm):
            for name, members in group_by_block(sites).items():
                stats[name] = self._block(gm, ctx, name, members, generator)
        gm.recompile()
        flipped = sum(b["flipped"] for b in stats.values())
        return PassResult(gm, True, {"blocks": len(stats), "iters": self.iters, "flipped_vs_nearest": flipped,
                                     "per_block": stats})

    def _block(self, gm, ctx, name: str, members: list[str], generator: torch.Generator) -> dict:
        block = extract(gm, name, members)
        data = capture(gm, ctx, block, self.batches)
        floats = [get_attr(gm, t).detach().clone() for t in block.weights]
        with torch.no_grad():
            targets = [block.run(x, floats) for x in data]
        site_of = dict(zip(block.weights, block.sites))
        rounded = [_Rounded(w, ctx.qparams[f"{site_of[t]}.weight"]) for t, w in zip(block.weights, floats)]
        with torch.no_grad():
            nearest_err = sum(float(output_loss(block.run(x, [r.nearest() for r in rounded]), t))
                              for x, t in zip(data, targets)) / len(data)
        opt = torch.optim.Adam([r.v for r in rounded], lr=self.lr)
        for it in ctx.progress(range(self.iters), desc=f"brecq {name}", unit="it"):
            i = int(torch.randint(len(data), (1,), generator=generator, device="cpu"))  # a CPU draw under any default device
            loss = output_loss(block.run(data[i], [r.soft() for r in rounded]), targets[i])
            beta = beta_at(it, self.iters, self.warmup)
            if beta is not None:
                loss = loss + self.weight * sum(round_regularizer(r.v, beta) for r in rounded)
            opt.zero_grad()
            loss.backward()
            opt.step()
        hard = [r.hard() for r in rounded]
        with torch.no_grad():
            learned_err = sum(float(output_loss(block.run(x, hard), t)) for x, t in zip(data, targets)) / len(data)
            for target, w in zip(block.weights, hard):
                get_attr(gm, target).copy_(w)
        flipped = sum(int((h != r.nearest()).sum()) for h, r in zip(hard, rounded))
        return {"sites": block.sites, "nearest_err": nearest_err, "learned_err": learned_err, "flipped": flipped}
