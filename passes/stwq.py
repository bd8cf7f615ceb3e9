"""``stwq``: Static Token-Wise Quantization (PTQ4ARVG §4; reference/method.md §4).

Each linear input gets one static (scale, zero point) per token group instead of one per
tensor: sink tokens (class/condition/first-scale tokens) and the scales of VAR keep their own
ranges, and nothing is computed at run time. The model's step graph carries a
``token_groups`` input (the group id of every token of the step); sites that merge groups
(``ctx.config.group_maps``) were observed with their merged ids already.

Scales are stored as a table indexed by the model's group id (merged groups repeat their
entry), so ``insert-qdq`` lowers every site the same way: ``Gather(table, token_groups)``.
Ranges come from min-max or from the reference's percentile-MSE search (``method=mse``).
Inputs without a token axis (a condition vector) keep a per-tensor grid.
"""
from __future__ import annotations

import fnmatch

import torch

from core import qmath
from core.errors import UserError
from core.qmath import QParams
from passes.infra import Pass, PassContext, PassResult, register
from passes.observe import site_group_map
from passes.quantize import act_bits


@register
class STWQ(Pass):
    name = "stwq"
    bits: int = 0
    symmetric: bool = False
    method: str = "minmax"  # minmax | mse
    sites: str = "*"  # module-path glob of the linears to quantize token-wise

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if self.method not in ("minmax", "mse"):
            raise UserError(f"stwq: method must be minmax or mse, got {self.method!r}")
        bits = act_bits(self.bits, ctx)
        grouped = per_tensor = 0
        for name, site in ctx.sites.items():
            if site.kind != "linear" or site.excluded_by or not fnmatch.fnmatchcase(name, self.sites):
                continue
            obs = ctx.stats.get(name, {}).get("input")
            if obs is None or obs.min is None:
                continue
            if not obs.grouped:
                lo, hi = self._range(obs, bits, None)
                scale, zp = qmath.qparams_from_range(lo, hi, bits, self.symmetric)
                ctx.qparams[f"{name}.input"] = QParams(scale, zp, bits, self.symmetric, "tensor", 0)
                per_tensor += 1
                continue
            site_scales, site_zps = [], []
            for g in range(obs.groups):
                if obs.group_count[g] == 0:  # a merged id no token maps to: any valid grid
                    site_scales.append(torch.tensor(1.0))
                    site_zps.append(torch.tensor(0, dtype=torch.int8))
                    continue
                lo, hi = self._range(obs, bits, g)
                s, z = qmath.qparams_from_range(lo, hi, bits, self.symmetric)
                site_scales.append(s.reshape(()))
                site_zps.append(z.reshape(()))
            mapping = site_group_map(ctx, name) or list(range(obs.groups))
            if max(mapping) >= obs.groups:
                raise UserError(f"stwq: {name}: group map refers to group {max(mapping)}, observed {obs.groups}")
            idx = torch.tensor(mapping)
            table_s, table_z = torch.stack(site_scales)[idx], torch.stack(site_zps)[idx]
            ctx.qparams[f"{name}.input"] = QParams(table_s, table_z, bits, self.symmetric, "group", -2)
            grouped += 1
        if grouped == 0:
            raise UserError("stwq found no token-grouped activations: the model needs a token_groups input "
                            "(family frontends provide one) and 'observe' must run before 'stwq'")
        return PassResult(gm, False, {"token_wise": grouped, "per_tensor": per_tensor, "bits": bits})

    def _range(self, obs, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "mse":
            return obs.search_range(bits, self.symmetric, group=group)
        if group is None:
            return obs.min.min(), obs.max.max()
        return obs.group_min[group].min(), obs.group_max[group].max()
