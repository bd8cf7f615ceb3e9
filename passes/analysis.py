"""What a report shows about a compilation, computed from the pass context: no files, no printing.

* ``StatsHistory``: an instrument keeping, after every pass that produced new activation
  statistics (``observe``, the folding passes), each site's per-channel and per-token-group
  min/max: the "before/after folding" picture.
* ``PreQDQSnapshot``: an instrument keeping the graph just before ``insert-qdq`` (folded,
  every quantization decided, nothing inserted).
* ``site_sqnr``: output SQNR against FP with only one site quantized, and with every site
  but one, using that snapshot and the compile's own decisions (``insert-qdq`` applied to a
  subset of ``ctx.qparams``): one calibration run for every variant.
* ``channel_absmax`` / ``group_absmax``: the numbers the report's plots draw.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch

from calib.observers import TensorObserver
from core.numerics import run_outputs, sqnr_db
from core.progress import no_progress
from passes.infra import PassContext, parse_pipeline


class StatsHistory:
    """Per-site input statistics after each pass that replaced them: ``[(pass label, {site: stats})]``."""

    def __init__(self):
        self.snapshots: list[tuple[str, dict[str, dict]]] = []
        self._seen: dict[str, TensorObserver] = {}

    def start(self, pipeline: str) -> None:
        self.snapshots, self._seen = [], {}

    def after_pass(self, index, pass_, result, ctx: PassContext, record) -> None:
        taken = {}
        for site, stats in ctx.stats.items():
            obs = stats.get("input")
            if not isinstance(obs, TensorObserver) or obs.min is None or self._seen.get(site) is obs:
                continue
            self._seen[site] = obs
            # CPU copies: the history feeds reports and plots, whatever device calibration ran on
            taken[site] = {"min": obs.min.to("cpu", torch.float32, copy=True),
                           "max": obs.max.to("cpu", torch.float32, copy=True)}
            if obs.grouped:
                taken[site]["group_min"] = obs.group_min.to("cpu", torch.float32, copy=True)
                taken[site]["group_max"] = obs.group_max.to("cpu", torch.float32, copy=True)
        if taken:
            self.snapshots.append((f"{index}:{pass_.name}", taken))

    def finish(self, records, ctx, pipeline) -> None:
        pass

    def first_and_last(self, site: str) -> tuple[tuple[str, dict], tuple[str, dict]] | None:
        """(label, stats) of the first and the last snapshot of ``site``; None if it changed no more than once."""
        seen = [(label, snap[site]) for label, snap in self.snapshots if site in snap]
        return (seen[0], seen[-1]) if len(seen) > 1 else None


class PreQDQSnapshot:
    """A copy of the graph right before the pipeline's ``insert-qdq`` (None if it never ran)."""

    def __init__(self):
        self.gm = None
        self._names: list[str] = []

    def start(self, pipeline: str) -> None:
        self.gm, self._names = None, [p.name for p in parse_pipeline(pipeline)]

    def after_pass(self, index, pass_, result, ctx, record) -> None:
        if index + 1 < len(self._names) and self._names[index + 1] == "insert-qdq":
            self.gm = copy.deepcopy(result.gm)

    def finish(self, records, ctx, pipeline) -> None:
        pass


def output_sqnr_db(reference: list[list[torch.Tensor]], gm, batches: list[tuple]) -> float:
    """Worst SQNR (dB) over outputs and batches of ``gm`` against the reference outputs of each batch."""
    return min(sqnr_db(r, g) for inputs, ref in zip(batches, reference, strict=True)
               for r, g in zip(ref, run_outputs(gm, inputs), strict=True))


def quantized_sites(ctx: PassContext) -> list[str]:
    """Sites holding at least one quantization decision, in graph order."""
    decided = {k.rsplit(".", 1)[0] for k in ctx.qparams}
    return [s for s in ctx.sites if s in decided]


def with_sites(pre_qdq, ctx: PassContext, keep: Iterable[str]):
    """The snapshot with Q/DQ inserted for the sites in ``keep`` only, with the compile's decisions."""
    from passes.insert_qdq import InsertQDQ

    keep = set(keep)
    sub = PassContext(config=ctx.config, sites=ctx.sites,
                      qparams={k: v for k, v in ctx.qparams.items() if k.rsplit(".", 1)[0] in keep})
    return InsertQDQ()(copy.deepcopy(pre_qdq), sub).gm


def site_sqnr(fp_gm, pre_qdq, ctx: PassContext, batches: list[tuple], *, all_but_one: bool = True,
              progress: Callable = no_progress) -> dict[str, dict]:
    """``{site: {"only": dB, "all_but": dB}}``: the model's output SQNR against FP with only this
    site quantized, and with every quantized site but this one (``all_but_one=False`` skips it).

    Excluding a site in a real compile also skips folds whose every sink is excluded and the
    site's calibration; both are numerics-preserving, so the ranking is the same.
    """
    reference = [run_outputs(fp_gm, inputs) for inputs in batches]
    sites = quantized_sites(ctx)
    out = {}
    for site in progress(sites, desc="quantizing one site at a time", unit="site"):
        row = {"only": output_sqnr_db(reference, with_sites(pre_qdq, ctx, [site]), batches)}
        if all_but_one:
            row["all_but"] = output_sqnr_db(reference, with_sites(pre_qdq, ctx, [s for s in sites if s != site]), batches)
        out[site] = row
    return out


def rank_sites(sensitivity: dict[str, dict]) -> list[str]:
    """Worst first: lowest SQNR with only the site quantized, then highest SQNR without it."""
    return sorted(sensitivity, key=lambda s: (sensitivity[s]["only"], -sensitivity[s].get("all_but", 0.0)))


# -- plot data -------------------------------------------------------------------------------------

def absmax(stats: dict) -> torch.Tensor:
    """Per-channel max |x| ``[C]`` of a ``StatsHistory`` entry."""
    return torch.maximum(stats["min"].abs(), stats["max"].abs())


def channel_absmax(history: StatsHistory, site: str) -> dict | None:
    """Per-channel max |input| of ``site`` at its first and last snapshot (before/after the folds)."""
    pair = history.first_and_last(site)
    if pair is None:
        return None
    (before_label, before), (after_label, after) = pair
    return {"before": absmax(before), "after": absmax(after), "before_label": before_label, "after_label": after_label}


def group_absmax(history: StatsHistory) -> dict[str, torch.Tensor]:
    """``{site: [G]}``: max |input| over channels per token group, at each site's last snapshot."""
    last: dict[str, dict] = {}
    for _, snap in history.snapshots:
        last.update(snap)
    return {site: torch.maximum(s["group_min"].abs(), s["group_max"].abs()).amax(dim=1)
            for site, s in last.items() if "group_min" in s}


def outlier_ratio(stats: dict) -> float:
    """max / median of the per-channel max |x|: how much a few channels dominate the grid."""
    a = absmax(stats)
    return float(a.max() / a.median().clamp(min=1e-12))
