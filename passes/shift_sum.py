"""``shift-sum``: Shift-and-Sum quantization of attention values (Moon & Ham; method.md §12.2).

At an attention ``out = A @ V`` (the ``<module>.matmul2`` sites of ``canonicalize``), the
quantization error of value row ``j`` reaches the output weighted by the attention it
receives, so rows that receive much attention (sink tokens, VAR's coarse scales) are
quantized ``N_j`` times with shifted grids and averaged: the grid of those rows becomes
``delta / N_j``::

    score_j = mean over queries of A[..., :, j]
    n_j     = clamp(ceil(log2(score_j / theta)), 0, 3),   N_j = 2^n_j
    f(v)    = (1/N) sum_{i=-N/2}^{N/2-1} Q(v + (2i+1)/(2N) * delta)      (N_j = 1: plain Q(v))

Two forms, both run after ``insert-qdq`` (they rewrite the matmul that it left):

``mode=dynamic`` is the reference code (``Shift_and_Sum_Quantizer``, ``QuantMatMul``) simulated
in torch, for accuracy studies: ``V`` gets an asymmetric min-max grid per (batch, head) from
the live tensor, ``n`` is recomputed from the live (unquantized) attention every call, and the
average of the shifted integers is clamped to ``[0, 2^b - 1]`` as the reference does. Any
static Q/DQ that ``insert-qdq`` put on ``V`` is replaced; the attention operand keeps its own.
It is not exportable (the grid and the selection are computed at run time).

``mode=static`` chooses the duplicated set at calibration: one run of the graph over
``ctx.calib_inputs`` averages the (unquantized) attention each key position receives per head,
which fixes ``N`` per (head, position). ``V`` keeps the static per-tensor grid that
``act-quant{matmuls=true}`` decided; the rows of positions ``H`` with some ``N > 1`` are
gathered, quantized ``Nmax`` times with per-(head, row) constant offsets (each of a row's
``N`` shifts repeated ``Nmax / N`` times, so the average is the same), and the result corrects
the plain product::

    out = A_q @ DQ(Q(V)) + A_q[..., H] @ (mean_m DQ(Q(V[..., H, :] + O_m)) - DQ(Q(V))[..., H, :])

which equals ``A_q @ V'`` with rows ``H`` of ``V'`` replaced by ``f``. It is Gather, Add,
Q/DQ, ReduceMean and MatMul with constant scales: it exports to ONNX. Positions are those of
the key axis as calibrated (the families' KV caches have a fixed length; a generic model's
sink tokens come first), so a longer key axis keeps them.

Differences from the reference, knowingly: none of method.md §10 (those are PTQ4ARVG's) apply.
The static form clamps each shifted copy to the b-bit grid (each copy is a real integer tensor)
where the reference clamps their average; the two differ only for values within half a step
of the range's ends. The reference picks ``theta`` from a 1 % BitOPs budget of the whole model;
here it is an option.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import fx

from core.errors import UserError
from passes import ops
from passes.infra import Pass, PassContext, PassResult, register, set_buffer
from passes.quantize import act_bits

MAX_ORDER = 3  # N in {1, 2, 4, 8}, as the reference clamps n to [0, 3]


def duplication_order(score: torch.Tensor, theta: float) -> torch.Tensor:
    """``n = clamp(ceil(log2(score / theta)), 0, 3)`` (a score of 0 gives 0)."""
    return torch.log2(score / theta).ceil().clamp(min=0, max=MAX_ORDER).nan_to_num(0.0).long()


def shift_offsets(order: int) -> list[float]:
    """The N = 2^order shifts of the grid, in steps: (2i + 1) / (2N) for i in [-N/2, N/2)."""
    if order == 0:
        return [0.0]
    n = 2 ** order
    return [(2 * i + 1) / (2 * n) for i in range(-n // 2, n // 2)]


def shift_sum_values(attn: torch.Tensor, v: torch.Tensor, bits: int, theta: float) -> torch.Tensor:
    """The reference's dynamic Shift-and-Sum quantizer of ``v [..., L, d]`` (dequantized).

    Grid per leading index (batch, head): asymmetric min-max over the last two axes on the
    unsigned ``[0, 2^b - 1]`` grid; ``attn [..., Tq, L]`` (unquantized) picks each row's order.
    """
    levels = 2 ** bits
    vf = v.float()
    hi, lo = vf.amax(dim=(-2, -1), keepdim=True), vf.amin(dim=(-2, -1), keepdim=True)
    delta = ((hi - lo) / (levels - 1)).clamp(min=1e-6)
    zero = -torch.round(lo / delta)
    order = duplication_order(attn.float().mean(dim=-2), theta).unsqueeze(-1)  # [..., L, 1]
    x = vf / delta
    x_int = torch.round(x) + zero
    for k in range(1, MAX_ORDER + 1):
        shifted = sum(torch.round(x + o) for o in shift_offsets(k)) / 2 ** k + zero
        x_int = torch.where(order == k, shifted, x_int)
    return ((x_int.clamp(0, levels - 1) - zero) * delta).to(v.dtype)


def _unquantized(node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the tensor before insert-qdq's Q/DQ, the Q node) of a matmul operand."""
    if node.op == "call_function" and node.target is ops.DQ:
        q = node.args[0]
        if isinstance(q, fx.Node) and q.op == "call_function" and q.target is ops.Q:
            return q.args[0], q
    return node, None


class _AttentionMeans(fx.Interpreter):
    """Runs the graph; adds, per watched attention ``[B, *heads, Tq, L]``, the sum over batch and
    queries ``[*heads, L]`` and the number of query rows summed."""

    def __init__(self, gm, watched: dict[fx.Node, str], sums: dict[str, list]):
        super().__init__(gm)
        self.watched, self.sums = watched, sums

    def run_node(self, n):
        out = super().run_node(n)
        site = self.watched.get(n)
        if site is not None:
            if out.dim() < 3:
                raise UserError(f"shift-sum: {site}: attention of shape {list(out.shape)} has no query and key axes")
            total = out.detach().double().sum(dim=(0, out.dim() - 2))
            rows = out.shape[0] * out.shape[-2]
            if site in self.sums:
                prev, count = self.sums[site]
                if prev.shape[:-1] != total.shape[:-1]:
                    raise UserError(f"shift-sum: {site}: attention heads changed between calibration batches "
                                    f"({list(prev.shape[:-1])} vs {list(total.shape[:-1])})")
                length = max(prev.shape[-1], total.shape[-1])  # key axes may differ: pad with zeros
                prev = torch.nn.functional.pad(prev, (0, length - prev.shape[-1]))
                total = torch.nn.functional.pad(total, (0, length - total.shape[-1]))
                count = torch.nn.functional.pad(count, (0, length - count.shape[-1]))
                cur = torch.zeros(length, dtype=torch.float64)
                cur[: out.shape[-1]] = rows
                self.sums[site] = [prev + total, count + cur]
            else:
                self.sums[site] = [total, torch.full((out.shape[-1],), float(rows), dtype=torch.float64)]
        return out


@register
class ShiftSum(Pass):
    """Options: ``mode`` dynamic | static; ``theta`` (a key position receiving more than theta of
    the attention, on average over queries, is duplicated); ``bits`` of V in dynamic mode (0: the
    compilation's activation bits); ``sites``, a glob of the attention-times-values matmuls."""

    name = "shift-sum"
    mode: str = "dynamic"
    theta: float = 0.05
    bits: int = 0
    sites: str = "*matmul2"

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if self.mode not in ("dynamic", "static"):
            raise UserError(f"shift-sum: mode must be dynamic or static, got {self.mode!r}")
        if not self.theta > 0:
            raise UserError(f"shift-sum: theta must be positive, got {self.theta}")
        targets = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("site") in ctx.sites
                   and ctx.sites[n.meta["site"]].kind == "matmul" and not ctx.sites[n.meta["site"]].excluded_by
                   and fnmatch.fnmatchcase(n.meta["site"], self.sites)]
        if not targets:
            raise UserError(f"shift-sum: no attention matmul matches {self.sites!r}: run canonicalize first, or "
                            "set sites= to the attention-times-values matmuls")
        if self.mode == "dynamic":
            return self._dynamic(gm, ctx, targets)
        return self._static(gm, ctx, targets)

    def _dynamic(self, gm, ctx: PassContext, targets: list[fx.Node]) -> PassResult:
        bits = act_bits(self.bits, ctx)
        g = gm.graph
        for node in targets:
            a_raw, _ = _unquantized(node.args[0])
            v_raw, _ = _unquantized(node.args[1])
            with g.inserting_before(node):
                values = g.call_function(shift_sum_values, (a_raw, v_raw, bits, self.theta))
            node.args = (node.args[0], values, *node.args[2:])
        g.eliminate_dead_code()  # the replaced static Q/DQ of V
        gm.recompile()
        return PassResult(gm, True, {"mode": "dynamic", "sites": len(targets), "bits": bits, "theta": self.theta})

    def _static(self, gm, ctx: PassContext, targets: list[fx.Node]) -> PassResult:
        if not ctx.calib_inputs:
            raise UserError("shift-sum{mode=static}: no calibration inputs: pass --calib-data FILE")
        for node in targets:
            if _unquantized(node.args[1])[1] is None:
                raise UserError(f"shift-sum{{mode=static}}: {node.meta['site']}: the values have no static Q/DQ; "
                                "put act-quant{matmuls=true} and insert-qdq before shift-sum")
        watched = {_unquantized(n.args[0])[0]: n.meta["site"] for n in targets}
        sums: dict[str, list] = {}
        with torch.no_grad():
            for inputs in ctx.progress(ctx.calib_inputs, desc="shift-sum", unit="batch"):
                _AttentionMeans(gm, watched, sums).run(*inputs)
        g = gm.graph
        per_site = {}
        for node in targets:
            site = node.meta["site"]
            total, count = sums[site]
            order = duplication_order(total / count.clamp(min=1), self.theta)  # [*heads, L]
            ctx.stats.setdefault(site, {})["shift_sum_order"] = order
            positions = torch.nonzero(order.reshape(-1, order.shape[-1]).amax(0)).flatten()
            per_site[site] = {"positions": positions.tolist(), "max_copies": 2 ** int(order.max())}
            if positions.numel() == 0:
                continue
            self._rewrite(gm, g, node, site, positions, order[..., positions])
        gm.recompile()
        duplicated = sum(len(s["positions"]) for s in per_site.values())
        return PassResult(gm, duplicated > 0, {"mode": "static", "theta": self.theta, "sites": per_site,
                                               "duplicated_positions": duplicated})

    def _rewrite(self, gm, g: fx.Graph, node: fx.Node, site: str, positions: torch.Tensor, order: torch.Tensor) -> None:
        """``out + A[..., H] @ (mean_m DQ(Q(V_H + O_m)) - DQ(Q(V))_H)`` after the matmul ``node``."""
        a_used, v_used = node.args[0], node.args[1]
        v_raw, q = _unquantized(v_used)
        _, scale_node, zp_node, axis, qmin, qmax = q.args
        scale = float(gm.get_buffer(scale_node.target))
        copies = 2 ** int(order.max())
        # offsets [copies, 1(batch), *heads, |H|, 1], in units of V's value: copy m of a row with
        # N shifts takes shift m mod N, so each shift appears copies / N times
        table = torch.tensor([[shift_offsets(int(k))[m % 2 ** int(k)] for k in order.flatten()]
                              for m in range(copies)], dtype=torch.float32)
        offsets = (table * scale).reshape(copies, 1, *order.shape, 1)
        base = site.replace(".", "_")
        index = set_buffer(gm, f"{site}.shift_sum_index", positions.clone())
        set_buffer(gm, f"{site}.shift_sum_offsets", offsets)
        users = list(node.users)
        with g.inserting_before(node.next):  # in order, right after the matmul
            idx = g.get_attr(index)
            offs = g.get_attr(f"{site}.shift_sum_offsets")
            v_h = g.call_function(torch.index_select, (v_raw, -2, idx))
            shifted = g.call_function(torch.add, (g.call_method("unsqueeze", (v_h, 0)), offs))
            qc = g.create_node("call_function", ops.Q, (shifted, scale_node, zp_node, axis, qmin, qmax),
                               name=f"{base}_shift_sum_q")
            dqc = g.create_node("call_function", ops.DQ, (qc, scale_node, zp_node, axis), name=f"{base}_shift_sum_dq")
            f_h = g.call_function(torch.mean, (dqc, 0))
            delta = g.call_function(torch.sub, (f_h, g.call_function(torch.index_select, (v_used, -2, idx))))
            a_h = g.call_function(torch.index_select, (a_used, -1, idx))
            corr = g.call_function(torch.matmul, (a_h, delta))
            out = g.call_function(torch.add, (node, corr))
        for u in users:
            u.replace_input_with(node, out)
