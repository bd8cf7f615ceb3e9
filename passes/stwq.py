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

A model without a ``token_groups`` input (a generic fixed-length sequence model) gets groups
derived from the token position instead: per site, positions whose calibration ranges lie in
the same octave share a grid (``passes/position_groups.py`` says how and why; option
``max_position_groups``, 0 for one grid per position). The choice is noted in ``ctx.notes``.
"""
from __future__ import annotations

import fnmatch

import torch

from core import qmath
from core.errors import UserError
from core.qmath import QParams
from passes import position_groups as pg
from passes.infra import Pass, PassContext, PassResult, register
from passes.observe import site_group_map, token_groups_input
from passes.quantize import act_bits


@register
class STWQ(Pass):
    name = "stwq"
    bits: int = 0
    symmetric: bool = False
    method: str = "minmax"  # minmax | mse
    sites: str = "*"  # module-path glob of the linears to quantize token-wise
    max_position_groups: int = 4  # groups derived from positions (no token_groups input): octaves per site; 0: one per position

    def __call__(self, gm, ctx: PassContext) -> PassResult:
        if self.method not in ("minmax", "mse"):
            raise UserError(f"stwq: method must be minmax or mse, got {self.method!r}")
        if self.max_position_groups < 0:
            raise UserError(f"stwq: max-position-groups must be 0 (one per position) or more, got {self.max_position_groups}")
        bits = act_bits(self.bits, ctx)
        eligible = [name for name, site in ctx.sites.items()
                    if site.kind == "linear" and not site.excluded_by and fnmatch.fnmatchcase(name, self.sites)
                    and getattr(ctx.stats.get(name, {}).get("input"), "min", None) is not None]
        positions = {}
        if not any(ctx.stats[n]["input"].grouped for n in eligible) and token_groups_input(gm, ctx) is None:
            positions = self._position_groups(gm, ctx, eligible)
        grouped = per_tensor = 0
        for name in eligible:
            obs = ctx.stats[name]["input"]
            if name in positions:
                obs, buckets = positions[name]
                ctx.stats[name]["input"] = obs
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
            mapping = buckets.tolist() if name in positions else (site_group_map(ctx, name) or list(range(obs.groups)))
            if max(mapping) >= obs.groups:
                raise UserError(f"stwq: {name}: group map refers to group {max(mapping)}, observed {obs.groups}")
            idx = torch.tensor(mapping)
            table_s, table_z = torch.stack(site_scales)[idx], torch.stack(site_zps)[idx]
            ctx.qparams[f"{name}.input"] = QParams(table_s, table_z, bits, self.symmetric, "group", -2)
            grouped += 1
        if grouped == 0:
            raise UserError("stwq found no token-grouped activations: the model needs a token_groups input "
                            "(family frontends provide one) or linear inputs [..., T, C] with a fixed token count T "
                            "(groups are then derived from positions), and 'observe' must run before 'stwq'")
        stats = {"token_wise": grouped, "per_tensor": per_tensor, "bits": bits}
        if positions:
            stats["position_groups"] = {n: pg.describe_buckets(b) for n, (_, b) in positions.items()}
        return PassResult(gm, bool(positions), stats)

    def _position_groups(self, gm, ctx: PassContext, eligible: list[str]) -> dict:
        """{site: (observer grouped by position buckets, bucket of each position)} for a model
        without token groups; registers the constant positions and notes the choice."""
        inputs = ctx.probe_inputs if ctx.probe_inputs is not None else (ctx.calib_inputs[0] if ctx.calib_inputs else None)
        if inputs is None or not eligible:
            return {}
        tokens, sites = pg.token_axis_sites(gm, inputs, set(eligible))
        if not sites:
            return {}
        sites = [n for n in eligible if n in sites]  # graph order, as ctx.sites
        ranges = pg.position_ranges(gm, ctx, sites, tokens)
        buckets = {n: pg.octave_buckets(lo, hi, self.symmetric, self.max_position_groups) for n, (lo, hi) in ranges.items()}
        if not buckets:
            return {}
        observers = pg.bucket_observers(gm, ctx, buckets, tokens, histograms=self.method == "mse")
        pg.register_positions(gm, tokens)
        how = ("one grid per position" if self.max_position_groups == 0 else
               f"per site, positions whose calibration range is in the same octave share a grid, at most "
               f"{self.max_position_groups} groups")
        counts = sorted({int(b.max()) + 1 for b in buckets.values()})
        example = max(buckets, key=lambda n: int(buckets[n].max()))  # the site with the most groups
        ctx.notes.append(
            f"stwq: the model has no token_groups input; token groups derived from the {tokens} token positions "
            f"({how}): {len(buckets)} linears grouped, "
            + (f"{counts[0]} groups each" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} groups each")
            + f" (e.g. {example}: {pg.describe_buckets(buckets[example])})"
            + (f"; {len(eligible) - len(buckets)} linears without a [.., {tokens}, C] token axis keep per-tensor grids "
               f"({', '.join(n for n in eligible if n not in buckets)})" if len(buckets) < len(eligible) else ""))
        return {n: (observers[n], buckets[n]) for n in buckets}

    def _range(self, obs, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "mse":
            return obs.search_range(bits, self.symmetric, group=group)
        if group is None:
            return obs.min.min(), obs.max.max()
        return obs.group_min[group].min(), obs.group_max[group].max()
