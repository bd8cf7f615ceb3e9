"""Streaming activation statistics, one observer per quantizable tensor (site + role).

Observers never keep activations. Their state is fixed once the channel count C, the number
of token groups G and the histogram size are known (`TensorObserver.memory_bound`), so memory
does not grow with the number of calibration samples. The channel axis is the last one
(``[..., C]``), the token axis the one before it (``[B, T, C]``), which holds for every linear
input and attention operand we observe.

Per tensor an observer keeps:

- per-channel min / max / sum of squares (SmoothQuant and GPS statistics, method.md §3);
- a histogram of all elements, for the percentile-MSE range search (method.md §2.1).

Per token group (STWQ, method.md §4), when `update` gets group ids, it also keeps per-group
per-channel min / max, the per-group row count and one histogram per group.

Accuracy of `search_range` against the exact search (torch.quantile on all the data, then
the true MSE of each candidate grid): a quantile is off by less than one bin width (about
2·span/bins: power-of-two widths, doubled as the range grows), and each candidate's MSE is
integrated exactly for data spread uniformly inside each bin. Measured with 2048 bins on
Gaussian data with 0.1 % outliers at 20-60 sigma, in 8 batches whose range grows (6 seeds,
W4/W6/W8, symmetric and not): quantiles within 0.43 bin width, estimated MSEs within 1.6 %
of the true ones, and the chosen range's true MSE at most 0.27 % above the exact search's
(1024 bins: 0.8 %). tests/test_observers.py asserts 1 bin and 1 %.
"""
from __future__ import annotations

import math

import torch

from core import qmath
from core.errors import UserError
from core.qmath import scale_shift

DEFAULT_BINS = 2048
PERCENTILES = (0.999, 0.9999, 0.99999)  # the reference's candidates (method.md §2.1)
_CHUNK = 1 << 22  # values per torch.histc call: its float32 bin counts stay exact


class StreamingHistogram:
    """R independent fixed-size histograms over growing ranges, one per row.

    Row r counts values in ``bins`` bins of width ``w_r``, a power of two, from ``origin_r``,
    a multiple of ``w_r``. When a batch falls outside, the row grows: the width doubles k
    times and the origin is re-aligned to it, so every new edge is an old edge and each old
    bin lies entirely inside one new bin. Re-binning therefore loses nothing: the counts are
    exactly those of the final grid, whatever order the data came in. (torch.histc works in
    float32: a value within about bins·2^-24 bin widths of an edge may land in the
    neighbouring bin.) The exact extremes of each row are kept beside the counts.
    """

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 16:
            raise UserError(f"histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        f64 = {"dtype": torch.float64}
        self.counts = torch.zeros(0, bins, **f64)
        self.origin = torch.zeros(0, **f64)
        self.width = torch.zeros(0, **f64)  # 0 while a row has no data
        self.lo = torch.zeros(0, **f64)
        self.hi = torch.zeros(0, **f64)

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.counts, self.origin, self.width, self.lo, self.hi))

    def cover(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Make row r cover [lo[r], hi[r]] (rows with lo > hi got no data); adds missing rows."""
        lo, hi = lo.double().reshape(-1), hi.double().reshape(-1)
        self._add_rows(lo.numel())
        self.lo[: lo.numel()] = torch.minimum(self.lo[: lo.numel()], lo)
        self.hi[: hi.numel()] = torch.maximum(self.hi[: hi.numel()], hi)
        top = self.origin + self.bins * self.width
        for r in (lo <= hi).nonzero().flatten().tolist():
            if self.width[r] == 0:
                self._start(r, float(lo[r]), float(hi[r]))
            elif lo[r] < self.origin[r] or hi[r] >= top[r]:
                self._grow(r, float(lo[r]), float(hi[r]))

    def add(self, values: torch.Tensor, row: int = 0) -> None:
        """Count ``values`` into row ``row``, whose range `cover` has made contain them.

        torch.histc never drops them: float32 rounding of the grid's ends is monotonic, so
        the rounded ends still enclose float32 data inside the float64 ends. Chunks of at
        most 2^22 values keep histc's float32 per-bin sums exact.
        """
        start = float(self.origin[row])
        end = start + self.bins * float(self.width[row])
        for chunk in values.reshape(-1).split(_CHUNK) if values.numel() > _CHUNK else (values,):
            self.counts[row] += torch.histc(chunk, self.bins, start, end).double()

    def quantile(self, q: float, row: int = 0) -> float:
        """The q-quantile as torch.quantile defines it: linear between order statistics i and i+1, i = floor(q(n-1)).

        Order statistic i (0-based) is estimated as F^-1(i + 1/2), F the piecewise-linear CDF
        that spreads each bin's count uniformly over the bin, clamped to the row's exact
        [min, max]: it lies in the same bin as the true one, so the error is below one bin width.
        """
        counts = self.counts[row]
        cum = counts.cumsum(0)
        pos = q * (float(cum[-1]) - 1)
        i = math.floor(pos)
        ranks = torch.tensor([i, min(i + 1, float(cum[-1]) - 1)], dtype=torch.float64) + 0.5
        j = torch.searchsorted(cum, ranks).clamp(max=self.bins - 1)
        frac = (ranks - (cum[j] - counts[j])) / counts[j]
        stats = (self.origin[row] + (j + frac) * self.width[row]).clamp(self.lo[row], self.hi[row])
        return float(stats[0] + (pos - i) * (stats[1] - stats[0]))

    def mse(self, scale: float, zero_point: int, qmin: int, qmax: int, row: int = 0) -> float:
        """Mean squared quantize/dequantize error of the row's data on the grid (scale, zero_point).

        Each bin's count is spread uniformly over the bin (clipped to the row's exact extremes),
        and the error is integrated exactly: E = sum_j n_j (H(b_j) - H(a_j)) / (b_j - a_j) / n
        with H the antiderivative of err(x)^2 (`_sq_error_integral`).
        """
        counts = self.counts[row]
        edges = float(self.origin[row]) + float(self.width[row]) * torch.arange(self.bins + 1, dtype=torch.float64)
        a = edges[:-1].clamp(float(self.lo[row]), float(self.hi[row]))
        b = edges[1:].clamp(float(self.lo[row]), float(self.hi[row]))
        g_lo, g_hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
        span = b - a
        integral = _sq_error_integral(b, scale, g_lo, g_hi) - _sq_error_integral(a, scale, g_lo, g_hi)
        at_point = (a - _grid_value(a, scale, g_lo, g_hi)).pow(2)
        per_bin = torch.where(span > 0, integral / span.clamp(min=1e-300), at_point)
        return float((counts * per_bin).sum() / counts.sum())

    def state_dict(self) -> dict:
        return {"bins": self.bins, "counts": self.counts.clone(), "origin": self.origin.clone(),
                "width": self.width.clone(), "lo": self.lo.clone(), "hi": self.hi.clone()}

    @classmethod
    def from_state(cls, state: dict) -> StreamingHistogram:
        hist = cls(state["bins"])
        for key in ("counts", "origin", "width", "lo", "hi"):
            setattr(hist, key, state[key].clone())
        return hist

    def _add_rows(self, rows: int) -> None:
        extra = rows - self.rows
        if extra <= 0:
            return
        f64 = {"dtype": torch.float64}
        self.counts = torch.cat([self.counts, torch.zeros(extra, self.bins, **f64)])
        self.origin = torch.cat([self.origin, torch.zeros(extra, **f64)])
        self.width = torch.cat([self.width, torch.zeros(extra, **f64)])
        self.lo = torch.cat([self.lo, torch.full((extra,), math.inf, **f64)])
        self.hi = torch.cat([self.hi, torch.full((extra,), -math.inf, **f64)])

    def _start(self, r: int, lo: float, hi: float) -> None:
        """Width: the smallest power of two w with (bins - 1)·w >= span; origin: lo rounded down to a multiple of w."""
        span = hi - lo if hi > lo else max(abs(lo) * 2.0**-10, 1e-30)
        e = math.frexp(span / (self.bins - 1))[1]  # 2^e >= span / (bins - 1)
        width = math.ldexp(1.0, e)
        self.origin[r], self.width[r] = math.floor(lo / width) * width, width

    def _grow(self, r: int, lo: float, hi: float) -> None:
        """Double the width k times (origin re-aligned to the new width) until the old range and [lo, hi] fit.

        Old and new edges are all multiples of the old width, so old bin j falls entirely in
        new bin (j + m) >> k, m = (old origin - new origin) / old width, computed in integers.
        """
        origin, width = float(self.origin[r]), float(self.width[r])
        top = origin + self.bins * width
        k = 0
        while True:
            new_width = math.ldexp(width, k)
            new_origin = math.floor(min(lo, origin) / new_width) * new_width
            end = new_origin + self.bins * new_width
            if hi < end and top <= end:
                break
            k += 1
        m = int(origin / width) - (int(new_origin / new_width) << k)
        target = torch.tensor([(m + j) >> k for j in range(self.bins)])
        self.counts[r] = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, target, self.counts[r])
        self.origin[r], self.width[r] = new_origin, new_width


def _grid_value(x: torch.Tensor, scale: float, g_lo: float, g_hi: float) -> torch.Tensor:
    """Dequantized value of x on the grid {k·scale} clipped to [g_lo, g_hi] (the zero point is an integer)."""
    return (torch.round(x / scale) * scale).clamp(g_lo, g_hi)


def _sq_error_integral(x: torch.Tensor, s: float, g_lo: float, g_hi: float) -> torch.Tensor:
    """H(x) = integral of (t - Q(t))^2 dt up to x, up to a constant.

    Inside [g_lo, g_hi] the error is the sawtooth r = t - s·round(t/s); with k = round(x/s)
    its integral from -s/2 is k·s^3/12 + (r^3 + s^3/8)/3. Beyond the grid the error is the
    clipping distance, whose squares integrate to (x - g_hi)^3/3 and -(g_lo - x)^3/3.
    """
    inside = x.clamp(g_lo, g_hi)
    k = torch.round(inside / s)
    r = inside - k * s
    sawtooth = k * s**3 / 12 + (r**3 + s**3 / 8) / 3
    return sawtooth + (x - g_hi).clamp(min=0).pow(3) / 3 - (g_lo - x).clamp(min=0).pow(3) / 3


class TensorObserver:
    """Per-channel and per-token-group statistics of a stream of tensors, with range search."""

    def __init__(self, name: str, bins: int = DEFAULT_BINS, *, histograms: bool = True):
        self.name = name
        self.bins = bins
        self.histograms = histograms  # off: min/max/sum of squares only, about 3x cheaper per update
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0
        self.batches = 0
        self.grouped: bool | None = None  # fixed by the first update
        self.group_min = torch.zeros(0, 0)  # [G, C]
        self.group_max = torch.zeros(0, 0)
        self.group_count = torch.zeros(0, dtype=torch.int64)  # rows (sample x token) per group
        self.hist = StreamingHistogram(bins)
        self.group_hist = StreamingHistogram(bins)

    def update(self, x: torch.Tensor, groups: torch.Tensor | None = None, *, step: int | None = None) -> None:
        """Fold one batch in. ``groups`` (int64 ``[T]``) gives the token group of each position of ``x [..., T, C]``."""
        x = x.detach().float()
        if not torch.isfinite(x).all():
            where = f" at calibration step {step}" if step is not None else f" in batch {self.batches}"
            raise UserError(f"non-finite activation (NaN/Inf) at {self.name}{where}: check the model or its inputs")
        self._check_grouping(x, groups)
        flat = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
        self._update_channels(flat)
        if self.histograms:
            self.hist.cover(flat.min(), flat.max())
            self.hist.add(flat)
        if groups is not None:
            self._update_groups(x.reshape(-1, *x.shape[-2:]), groups.long())
        self.count += flat.shape[0]
        self.batches += 1

    @property
    def channels(self) -> int:
        return 0 if self.min is None else int(self.min.numel())

    @property
    def groups(self) -> int:
        return int(self.group_count.numel())

    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    def quantile(self, q: float, group: int | None = None) -> float:
        """The q-quantile of all observed elements (of one token group), within one histogram bin."""
        hist, row = self._hist_row(group)
        return hist.quantile(q, row)

    def search_range(self, bits: int, symmetric: bool, candidates: tuple[float, ...] = PERCENTILES,
                     group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's percentile-MSE range search (method.md §2.1), streaming.

        For each p in ``candidates``: [lo, hi] = [quantile(1-p), quantile(p)], the grid is
        ``qmath.qparams_from_range(lo, hi, bits, symmetric)`` and its error is the histogram's
        expected mean((x - Q(x))^2). Returns the (lo, hi) of the smallest error, first
        candidate on ties, as 0-d float32 tensors. ``group`` searches one token group (STWQ).
        """
        hist, row = self._hist_row(group)
        qmin, qmax = qmath.qrange(bits)
        best = None
        for p in candidates:
            lo = torch.tensor(hist.quantile(1 - p, row), dtype=torch.float32)
            hi = torch.tensor(hist.quantile(p, row), dtype=torch.float32)
            scale, zp = qmath.qparams_from_range(lo, hi, bits, symmetric)
            err = hist.mse(float(scale), int(zp), qmin, qmax, row)
            if best is None or err < best[0]:
                best = (err, lo, hi)
        return best[1], best[2]

    @staticmethod
    def memory_bound(channels: int, groups: int = 0, bins: int = DEFAULT_BINS) -> int:
        """Bytes of an observer's state for C channels and G token groups, whatever the sample count."""
        per_channel = channels * (4 + 4 + 8)  # min, max (float32), sumsq (float64)
        per_group = groups * (channels * (4 + 4) + 8)  # group min/max [G, C], row count
        histograms = (1 + groups) * (bins + 4) * 8  # counts + origin, width, lo, hi (float64)
        return per_channel + per_group + histograms

    def memory_bytes(self) -> int:
        """Bytes held now; equals `memory_bound(channels, groups, bins)` once data has been seen."""
        tensors = [t for t in (self.min, self.max, self.sumsq, self.group_min, self.group_max, self.group_count)
                   if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + self.hist.nbytes() + self.group_hist.nbytes()

    def summary(self) -> dict:
        if self.min is None:
            return {"observed": False}
        out = {
            "observed": True,
            "channels": self.channels,
            "rows": self.count,
            "min": float(self.min.min()),
            "max": float(self.max.max()),
            "absmax_channel_ratio": float(self.absmax().max() / self.absmax().median().clamp(min=1e-12)),
            "memory_bytes": self.memory_bytes(),
        }
        if self.grouped:
            out["groups"] = {"count": self.groups, "rows": self.group_count.tolist(),
                             "min": self.group_min.amin(1).tolist(), "max": self.group_max.amax(1).tolist()}
        return out

    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings only: loadable with ``torch.load(weights_only=True)``."""
        return {
            "name": self.name, "bins": self.bins, "histograms": self.histograms, "count": self.count, "batches": self.batches,
            "grouped": self.grouped, "min": self.min, "max": self.max, "sumsq": self.sumsq,
            "group_min": self.group_min, "group_max": self.group_max, "group_count": self.group_count,
            "hist": self.hist.state_dict(), "group_hist": self.group_hist.state_dict(),
        }

    @classmethod
    def from_state(cls, state: dict) -> TensorObserver:
        obs = cls(state["name"], state["bins"], histograms=state.get("histograms", True))
        for key in ("count", "batches", "grouped", "min", "max", "sumsq", "group_min", "group_max", "group_count"):
            setattr(obs, key, state[key])
        obs.hist = StreamingHistogram.from_state(state["hist"])
        obs.group_hist = StreamingHistogram.from_state(state["group_hist"])
        return obs

    def _check_grouping(self, x: torch.Tensor, groups: torch.Tensor | None) -> None:
        grouped = groups is not None
        if self.grouped is not None and grouped != self.grouped:
            raise UserError(f"{self.name}: token groups given in some calibration batches but not in others")
        if grouped and (x.dim() < 2 or groups.dim() != 1 or groups.numel() != x.shape[-2]):
            raise UserError(f"{self.name}: token groups of shape {list(groups.shape)} do not match activation "
                            f"{list(x.shape)}: need one group id per token, [T] for [..., T, C]")
        if grouped and (groups.is_floating_point() or groups.is_complex() or (groups.numel() and groups.min() < 0)):
            raise UserError(f"{self.name}: token group ids must be non-negative integers")
        self.grouped = grouped

    def _update_channels(self, flat: torch.Tensor) -> None:
        lo, hi = flat.amin(0), flat.amax(0)
        sq = flat.double().pow(2).sum(0)
        if self.min is None:
            self.min, self.max, self.sumsq = lo, hi, sq
        else:
            self.min = torch.minimum(self.min, lo)
            self.max = torch.maximum(self.max, hi)
            self.sumsq = self.sumsq + sq

    def _update_groups(self, x: torch.Tensor, groups: torch.Tensor) -> None:
        """x: [B, T, C]. Tokens are sorted by group once; each group is then a slice of the token axis."""
        self._add_groups(int(groups.max()) + 1, x.shape[-1])
        order = torch.argsort(groups, stable=True)
        by_group = x[:, order] if bool((order.diff() < 0).any()) else x
        token_min, token_max = by_group.amin(0), by_group.amax(0)  # [T, C]
        sizes = torch.bincount(groups, minlength=self.groups)
        self.group_count += sizes * x.shape[0]
        ends = sizes.cumsum(0).tolist()
        slices = {g: slice(end - int(sizes[g]), end) for g, end in enumerate(ends) if sizes[g] > 0}
        for g, tokens in slices.items():
            self.group_min[g] = torch.minimum(self.group_min[g], token_min[tokens].amin(0))
            self.group_max[g] = torch.maximum(self.group_max[g], token_max[tokens].amax(0))
        if not self.histograms:
            return
        seen = sizes > 0
        self.group_hist.cover(torch.where(seen, self.group_min.amin(1), math.inf),
                              torch.where(seen, self.group_max.amax(1), -math.inf))
        for g, tokens in slices.items():
            self.group_hist.add(by_group[:, tokens], g)

    def _add_groups(self, groups: int, channels: int) -> None:
        extra = groups - self.groups
        if extra > 0:
            self.group_min = torch.cat([self.group_min.reshape(-1, channels), torch.full((extra, channels), math.inf)])
            self.group_max = torch.cat([self.group_max.reshape(-1, channels), torch.full((extra, channels), -math.inf)])
            self.group_count = torch.cat([self.group_count, torch.zeros(extra, dtype=torch.int64)])

    def _hist_row(self, group: int | None) -> tuple[StreamingHistogram, int]:
        if not self.histograms:
            raise UserError(f"{self.name}: percentile search needs histograms; run observe{{histograms=true}}")
        if group is None:
            if self.hist.rows == 0:
                raise UserError(f"{self.name}: no calibration data was observed")
            return self.hist, 0
        if not self.grouped or not 0 <= group < self.groups or self.group_count[group] == 0:
            raise UserError(f"{self.name}: token group {group} was never observed "
                            f"(observed groups: {(self.group_count > 0).nonzero().flatten().tolist()})")
        return self.group_hist, group


class FoldedObserver(TensorObserver):
    """Statistics of ``(x - p) / s`` derived from an observer of ``x``, without a calibration run.

    Per-channel min and max, and per-group per-channel min and max, map exactly (``s > 0``);
    the sum of squares maps under a pure scale (``/ s^2``) and is unknown (None) after a shift,
    which would need the per-channel sum. The per-tensor histograms cannot follow a
    per-channel transform, so the percentile searches refuse until ``observe`` runs again.
    """

    folded_by = ""

    @classmethod
    def of(cls, obs: TensorObserver, scale: torch.Tensor | None, shift: torch.Tensor | None, by: str) -> FoldedObserver:
        new = cls(obs.name, obs.bins, histograms=False)
        new.folded_by = ", ".join(filter(None, (getattr(obs, "folded_by", ""), by)))
        new.count, new.batches, new.grouped, new.group_count = obs.count, obs.batches, obs.grouped, obs.group_count
        new.min, new.max = (scale_shift(t, scale, shift).float() for t in (obs.min, obs.max))
        if obs.grouped:
            new.group_min, new.group_max = (scale_shift(t, scale, shift).float() for t in (obs.group_min, obs.group_max))
        if shift is None and obs.sumsq is not None:
            new.sumsq = obs.sumsq.double() / (1.0 if scale is None else scale.double().pow(2))
        return new

    def _refuse(self):
        raise UserError(f"{self.name}: the statistics were folded per channel (by {self.folded_by}) after 'observe'; "
                        f"percentile searches need fresh histograms: run 'observe' again before this pass")

    def quantile(self, q: float, group: int | None = None) -> float:
        self._refuse()

    def search_range(self, bits: int, symmetric: bool, candidates: tuple[float, ...] = (), group: int | None = None):
        self._refuse()
