"""``smooth{alpha=0.5}``: SmoothQuant, folded into every scale-folding region.

Per input channel ``c`` of a region's sinks (method.md §1 step 3 and §3.3)::

    s_c = max|X_c|^alpha / max_o |W_{o,c}|^(1 - alpha)

with both maxima clamped to at least 1e-6 (the reference's guard) and ``s`` to at least 1e-5
(SmoothQuant's). ``X`` is the sinks' input as last observed; ``W`` stacks the rows of every
sink that shares the input (qkv, or SwiGLU's w1 and w3), as SmoothQuant does for q, k and v.
The activation becomes ``x / s`` (folded into the source), the sinks' weights ``W·diag(s)``:
the float model is unchanged. The statistics of the folded tensor are rescaled in place of
another calibration run, so ``sym-shift`` can follow directly.

Not replicated: the reference drops the sink tokens from the statistics of qkv/fc1 (the
observers here do not keep tokens apart) and, in VAR/PAR, EMAs the scales over batches of
64 (method.md §3.3, §10.5); one pass over all calibration data is RAR's behaviour.
"""
from __future__ import annotations

import torch

from passes.infra import PassContext, register
from passes.regions import FoldingPass, Region


@register
class Smooth(FoldingPass):
    """Options: ``alpha``, the migration strength (0.5 in the reference); ``compensate``, also fold
    regions whose source feeds a non-linear op such as a post-LN residual (``passes/regions.py``)."""

    name = "smooth"
    stat_key = "smooth_scale"
    alpha: float = 0.5
    compensate: bool = False

    def plan(self, gm, ctx: PassContext, region: Region, shared=None) -> tuple[torch.Tensor, None]:
        x_max = self.input_stats(ctx, region).absmax().double().clamp(min=1e-6)
        w_max = region.sink_weights(gm).abs().amax(0).double().clamp(min=1e-6)
        return (x_max.pow(self.alpha) / w_max.pow(1 - self.alpha)).clamp(min=1e-5), None
