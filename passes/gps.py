"""``gps``: Gain-Projected Scaling (PTQ4ARVG, method.md §3), folded into every region.

For a region with input ``X`` (``[tokens, C]``, after SmoothQuant and the symmetric shift)
and sink weight ``W`` (``[outputs, C]``, every sink's rows stacked), method.md §3.2::

    Rx_c = max_t X[t,c] - min_t X[t,c]          Rw_c = max_o W[o,c] - min_o W[o,c]
    k    = argmax_c Rx_c                         s_k  = Rx_k^alpha / Rw_k^(1-alpha)   (alpha=0.5: sqrt)
    dX   = X - Q(X; delta_k, z_k)                channel k's asymmetric grid applied to every channel
    Wq   = Q_W(W),  dW = W - Wq                  per-output-channel weight quantizer
    A_c  = ||X_c||^2 · ||dW_:,c||^2              B_c = ||dX_c||^2 · ||Wq_:,c||^2
    s_c  = s_k · (A_c / B_c)^(1/4)  (c != k),    s_c = 1 where B_c = 0

It minimises ``s^2·B_c/s_k^2 + A_c·s_k^2/s^2`` per channel (the activation-error gain grows
with ``s_c``, the weight-error gain shrinks; method.md §3.3). The activation becomes ``x / s``
(folded into the source), the sinks' weights ``W·diag(s)``.

Statistics: ``Rx`` and channel k's grid come from the observed min/max (kept exact through
earlier folds); ``||X_c||^2`` and ``||dX_c||^2`` are streamed in one run of the graph over
``ctx.calib_inputs`` (no activation is kept). The activation grid is min-max at ``a_bits``,
widened to contain 0 as ``qmath`` does (the reference searches it by percentile-MSE, which
needs per-channel histograms the observers do not keep), the weight quantizer per-row
min-max at ``w_bits``, symmetric by default because that is what ``weight-quant`` deploys
(TensorRT); ``w_symmetric=false`` gives the reference's asymmetric rows (method.md §2.1).

When it helps (tests/test_folding.py): the closed form holds the activation step at channel
k's and the weight rows' steps fixed. With one dominant outlier channel both hold and GPS
beats SmoothQuant by 1-2 dB (W8A8, W6A6). With several equal outliers the others overtake k
after scaling and GPS only ties; at W4A8 the large weight error scales ordinary channels ~2.6x
above k, they set the rows' maxima, and GPS trails the symmetric shift alone.

Fixes of the reference, knowingly (method.md §3.3, §10.4): it has no epsilon guards, so
``Rw_k = 0`` gives ``s_k = inf`` and ``A_c = 0`` gives ``s_c = 0`` and then ``x / s = NaN``;
here ``Rx_k, Rw_k >= 1e-5`` and ``s >= 1e-5``. PAR's w3 got w1's scale computed from w1 alone
(§10.6); here every sink sharing the input is in ``W``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from core import qmath
from core.errors import UserError
from core.qmath import QParams
from passes.infra import PassContext, register
from passes.quantize import act_bits, weight_bits
from passes.regions import FoldingPass, Region

EPS = 1e-5


class _ErrorStream(fx.Interpreter):
    """Runs the graph; at each watched tensor ``x`` (``[..., C]``) adds, per channel, ``x^2``
    and ``(x - fake_quant(x, grid))^2`` summed over all tokens to ``sums[node]``."""

    def __init__(self, gm: fx.GraphModule, grids: dict[fx.Node, QParams], sums: dict[fx.Node, torch.Tensor]):
        super().__init__(gm)
        self.grids, self.sums = grids, sums

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        grid = self.grids.get(n)
        if grid is not None:
            x = out.detach().float().reshape(-1, out.shape[-1])
            err = x - qmath.fake_quant(x, grid)
            both = torch.stack([x.double().pow(2).sum(0), err.double().pow(2).sum(0)])  # [2, C]
            self.sums[n] = self.sums[n] + both if n in self.sums else both
        return out


def gps_scales(rx: torch.Tensor, x_sq: torch.Tensor, dx_sq: torch.Tensor, w: torch.Tensor, w_qp: QParams,
               alpha: float = 0.5) -> torch.Tensor:
    """The §3.2 formula from per-channel ``Rx``, ``||X_c||^2``, ``||dX_c||^2``, the weight ``W``
    ``[outputs, C]`` and its per-row quantizer; guarded as the module docstring says."""
    w = w.float()
    wq = qmath.fake_quant(w, w_qp).double()
    w = w.double()
    rw = w.amax(0) - w.amin(0)
    k = int(torch.argmax(rx))
    s_k = rx[k].clamp(min=EPS) ** alpha / rw[k].clamp(min=EPS) ** (1 - alpha)
    a = x_sq.double() * (w - wq).pow(2).sum(0)
    b = dx_sq.double() * wq.pow(2).sum(0)
    s = torch.where(b > 0, s_k * (a / b.clamp(min=1e-300)).pow(0.25), torch.ones_like(b))
    s[k] = s_k
    return s.clamp(min=EPS)


@register
class GPS(FoldingPass):
    """Options: ``alpha`` of ``s_k``; ``a_bits``/``w_bits`` (0: the compilation's); ``w_symmetric``; ``compensate``."""

    name = "gps"
    stat_key = "gps_scale"
    alpha: float = 0.5
    a_bits: int = 0
    w_bits: int = 0
    w_symmetric: bool = True
    compensate: bool = False  # also fold regions whose source feeds a residual (passes/regions.py)

    def prepare(self, gm, ctx: PassContext, regions: list[Region]) -> dict[fx.Node, torch.Tensor]:
        """Channel k's grid per region, then one streaming run for ``||X_c||^2`` and ``||dX_c||^2``."""
        if regions and not ctx.calib_inputs:
            raise UserError("gps: no calibration inputs: pass --calib-data FILE (a .pt list of input tuples)")
        bits = act_bits(self.a_bits, ctx)
        grids = {}
        for region in regions:
            obs = self.input_stats(ctx, region)
            k = int(torch.argmax(obs.max - obs.min))
            scale, zp = qmath.qparams_from_range(obs.min[k], obs.max[k], bits, symmetric=False)
            grids[region.input] = QParams(scale, zp, bits, symmetric=False)
        sums: dict[fx.Node, torch.Tensor] = {}
        with torch.no_grad():
            for inputs in ctx.progress(ctx.calib_inputs if grids else [], desc="gps", unit="batch"):
                _ErrorStream(gm, grids, sums).run(*inputs)
        return sums

    def plan(self, gm, ctx: PassContext, region: Region, shared: dict[fx.Node, torch.Tensor]) -> tuple[torch.Tensor, None]:
        obs = self.input_stats(ctx, region)
        x_sq, dx_sq = shared[region.input]
        w = region.sink_weights(gm)
        bits = weight_bits(self.w_bits, ctx)
        scale, zp = qmath.qparams_from_range(w.amin(1), w.amax(1), bits, self.w_symmetric)
        w_qp = QParams(scale, zp, bits, self.w_symmetric, "channel", 0)
        return gps_scales((obs.max - obs.min).double(), x_sq, dx_sq, w, w_qp, self.alpha), None
