"""``svd-lowrank{rank=8}``: SVDQuant's low-rank branch (Li et al., 2025), kept in full precision.

A PTQ4ARVG baseline (issue 19). Per quantized linear, the (already smoothed: run ``smooth``
first, as SVDQuant migrates activation outliers into the weights before the decomposition) weight
is split by its SVD ``W = U S V^T``::

    L1 = U[:, :r] diag(S[:r])   [out, r]      (``<site>.lowrank_up``)
    L2 = V^T[:r]                [r, in]       (``<site>.lowrank_down``)
    R  = W - L1 L2                            (stored as the site's weight)

and the linear becomes ``y = linear(x, R, b) + linear(linear(x, L2), L1)``. ``L1 L2`` is the best
rank-r approximation (Eckart-Young), so it takes the largest singular directions, where weight
outliers concentrate, and the residual ``R`` that ``weight-quant`` quantizes has a narrower range.
The branch reads the unquantized input and has no site, so it stays in float (two float MatMuls
in ONNX; SVDQuant runs it in 16 bits). In FP the graph is unchanged (``preserves_numerics``).
Run it after the folding passes: the branch is a second consumer of the input, which blocks later
folds into that region.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.errors import UserError
from passes.canonicalize import is_linear
from passes.fold_sources import assign
from passes.infra import Pass, PassContext, PassResult, get_attr, register, set_buffer


def low_rank_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L1, L2, R)`` with ``L1 @ L2`` the rank-``rank`` truncated SVD of ``w`` and ``R = w - L1 @ L2``
    (computed in float64)."""
    w64 = w.detach().double()
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)
    r = min(rank, s.numel())
    l1, l2 = u[:, :r] * s[:r], vh[:r]
    return l1, l2, w64 - l1 @ l2


@register
class SVDLowRank(Pass):
    """Options: ``rank`` of the float branch (capped at ``min(out, in)``)."""

    name = "svd-lowrank"
    preserves_numerics = True
    rank: int = 8

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if self.rank < 1:
            raise UserError(f"svd-lowrank: rank must be at least 1, got {self.rank}")
        g = gm.graph
        attr_users: dict[str, int] = {}
        for n in g.nodes:
            if n.op == "get_attr":
                attr_users[n.target] = attr_users.get(n.target, 0) + len(n.users)
        done: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        for node in list(g.nodes):
            site = node.meta.get("site")
            if site is None or not is_linear(node) or site not in ctx.sites or ctx.sites[site].excluded_by:
                continue
            w_node = node.args[1]
            if getattr(w_node, "op", None) != "get_attr":
                skipped[site] = "the weight is computed, not a parameter"
                continue
            if attr_users.get(w_node.target, 0) > 1:
                skipped[site] = f"{w_node.target} is shared with another op"
                continue
            w = get_attr(gm, w_node.target)
            l1, l2, r = low_rank_split(w, self.rank)
            assign(gm, w_node.target, r)
            up, down = set_buffer(gm, f"{site}.lowrank_up", l1.float()), set_buffer(gm, f"{site}.lowrank_down", l2.float())
            with g.inserting_after(node):
                down_w = g.get_attr(down)
            with g.inserting_after(down_w):
                hidden = g.call_function(F.linear, (node.args[0], down_w))
            with g.inserting_after(hidden):
                up_w = g.get_attr(up)
            with g.inserting_after(up_w):
                branch = g.call_function(F.linear, (hidden, up_w))
            with g.inserting_after(branch):
                total = g.call_function(torch.add, (node, branch))
            for n in (down_w, hidden, up_w, branch, total):
                n.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
            node.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
            w64 = w.detach().double()
            done[site] = {"rank": int(l1.shape[1]),
                          "energy": round(float((l1 @ l2).pow(2).sum() / w64.pow(2).sum().clamp(min=1e-30)), 4),
                          "absmax": [round(float(w64.abs().max()), 4), round(float(r.abs().max()), 4)]}
        g.lint()
        gm.recompile()
        return PassResult(gm, bool(done), {"linears": len(done), "rank": self.rank, "sites": done,
                                           **({"skipped": skipped} if skipped else {})})
