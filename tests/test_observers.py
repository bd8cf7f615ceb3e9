"""Streaming observers against direct computations on the stored activations (calib/observers.py)."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.observers import PERCENTILES, StreamingHistogram, TensorObserver
from core import qmath
from core.errors import UserError

GROUPS = torch.tensor([2, 0, 1, 1, 3, 2, 2, 3, 3, 0, 3, 1])  # unsorted on purpose
GRIDS = [(bits, sym) for bits in (4, 6, 8) for sym in (False, True)]


def _activations(seed: int, batches: int = 8, shape=(4, 12, 32)) -> list[torch.Tensor]:
    """Gaussian batches whose scale grows, with 0.1 % outliers at 20-60 sigma from batch 3 on."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        x = torch.randn(shape, generator=g) * (1 + 0.3 * b)
        if b >= 3:
            hit = torch.rand(shape, generator=g) < 1e-3
            far = torch.randn(shape, generator=g).sign() * (20 + 40 * torch.rand(shape, generator=g))
            x = torch.where(hit, far, x)
        out.append(x)
    return out


def _observe(batches, groups=None, bins=2048) -> TensorObserver:
    obs = TensorObserver("blocks.0.attn.qkv.input", bins=bins)
    for step, x in enumerate(batches):
        obs.update(x, groups, step=step)
    return obs


def _true_mse(x: torch.Tensor, lo, hi, bits: int, symmetric: bool) -> float:
    scale, zp = qmath.qparams_from_range(torch.as_tensor(lo), torch.as_tensor(hi), bits, symmetric)
    return float((x - qmath.fake_quant(x, qmath.QParams(scale, zp, bits, symmetric))).double().pow(2).mean())


def _exact_search(x: torch.Tensor, bits: int, symmetric: bool) -> float:
    """The reference search on all the data: torch.quantile candidates, smallest true MSE."""
    return min(_true_mse(x, torch.quantile(x, 1 - p), torch.quantile(x, p), bits, symmetric) for p in PERCENTILES)


def test_per_channel_stats_equal_direct_computation():
    batches = _activations(0)
    obs = _observe(batches, GROUPS)
    flat = torch.cat(batches).reshape(-1, 32)
    assert torch.equal(obs.min, flat.amin(0)) and torch.equal(obs.max, flat.amax(0))
    torch.testing.assert_close(obs.sumsq, flat.double().pow(2).sum(0), rtol=1e-12, atol=0)
    assert obs.count == flat.shape[0] and obs.batches == len(batches)
    assert torch.equal(obs.absmax(), flat.abs().amax(0))


def test_per_group_stats_equal_direct_computation():
    batches = _activations(1)
    obs = _observe(batches, GROUPS)
    data = torch.cat(batches)  # [B, T, C]
    assert obs.groups == 4
    for g in range(4):
        tokens = data[:, GROUPS == g]
        assert torch.equal(obs.group_min[g], tokens.amin((0, 1)))
        assert torch.equal(obs.group_max[g], tokens.amax((0, 1)))
        assert int(obs.group_count[g]) == tokens.shape[0] * tokens.shape[1]
        assert float(obs.group_hist.counts[g].sum()) == tokens.numel()


def test_quantiles_within_one_bin_of_torch_quantile():
    batches = _activations(2)
    obs = _observe(batches, GROUPS)
    data = torch.cat(batches)
    qs = (1e-5, 1e-4, 1e-3, 0.25, 0.5, 0.999, 0.9999, 0.99999)
    for q in qs:
        assert abs(obs.quantile(q) - float(torch.quantile(data.reshape(-1), q))) <= float(obs.hist.width[0])
    for g in range(4):
        tokens = data[:, GROUPS == g].reshape(-1)
        for q in qs:
            assert abs(obs.quantile(q, g) - float(torch.quantile(tokens, q))) <= float(obs.group_hist.width[g])


@pytest.mark.parametrize("seed", [3, 4])
def test_search_range_matches_exact_percentile_mse_search(seed):
    """The chosen range's true MSE is within 1 % of the exact search's (measured: <= 0.3 %)."""
    batches = _activations(seed)
    obs = _observe(batches)
    data = torch.cat(batches).reshape(-1)
    for bits, sym in GRIDS:
        lo, hi = obs.search_range(bits, sym)
        assert lo.dtype == torch.float32 and lo.dim() == 0
        assert _true_mse(data, lo, hi, bits, sym) <= 1.01 * _exact_search(data, bits, sym)


def test_search_range_per_group_matches_exact_search():
    batches = _activations(5)
    obs = _observe(batches, GROUPS)
    data = torch.cat(batches)
    for g in range(4):
        tokens = data[:, GROUPS == g].reshape(-1)
        for bits, sym in ((6, False), (8, True)):
            lo, hi = obs.search_range(bits, sym, group=g)
            assert _true_mse(tokens, lo, hi, bits, sym) <= 1.01 * _exact_search(tokens, bits, sym)


@pytest.mark.parametrize("clip", [1.0, 0.5, 0.05])
def test_histogram_mse_equals_true_mse_of_evenly_spread_data(clip):
    """Evenly spread data is what the uniform-in-bin model assumes: interior sawtooth and clipping both exact."""
    values = torch.linspace(-1, 1, 200_001)
    hist = StreamingHistogram(256)
    hist.cover(values.min(), values.max())
    hist.add(values)
    for bits, sym in GRIDS:
        scale, zp = qmath.qparams_from_range(torch.tensor(-clip), torch.tensor(clip), bits, sym)
        qmin, qmax = qmath.qrange(bits)
        expected = _true_mse(values, -clip, clip, bits, sym)
        assert hist.mse(float(scale), int(zp), qmin, qmax) == pytest.approx(expected, rel=1e-3)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_batches=st.integers(1, 6), constant_first=st.booleans())
def test_histogram_growth_rebins_exactly(seed, n_batches, constant_first):
    """Counts stay integral and complete, and each value sits in its final-grid bin (float32 edges: +-1)."""
    g = torch.Generator().manual_seed(seed)
    hist, seen = StreamingHistogram(64), []
    for b in range(n_batches):
        scale = 10 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        offset = scale * float(torch.empty(1).uniform_(-5, 5, generator=g))
        n = int(torch.randint(1, 300, (1,), generator=g))
        values = torch.full((n,), offset) if constant_first and b == 0 else torch.randn(n, generator=g) * scale + offset
        hist.cover(values.min(), values.max())
        hist.add(values)
        seen.append(values)
    data = torch.cat(seen).double()
    counts = hist.counts[0]
    assert torch.equal(counts, counts.round()) and float(counts.sum()) == data.numel()
    true_bin = ((data - hist.origin[0]) / hist.width[0]).floor()
    assert 0 <= true_bin.min() and true_bin.max() < 64
    below = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0)])  # values assigned below edge j
    for j in range(65):
        assert (true_bin < j - 1).sum() <= below[j] <= (true_bin < j + 1).sum()
    assert float(hist.lo[0]) == data.min() and float(hist.hi[0]) == data.max()


def test_memory_is_bounded_independently_of_samples():
    obs = TensorObserver("site.input")
    obs.update(torch.randn(2, 12, 32), GROUPS)
    after_one = obs.memory_bytes()
    for x in _activations(6, batches=6):
        obs.update(x, GROUPS)
    assert obs.memory_bytes() == after_one == TensorObserver.memory_bound(32, groups=4)
    assert obs.summary()["memory_bytes"] == after_one


def test_state_round_trips_through_weights_only_load():
    obs = _observe(_activations(7, batches=3), GROUPS)
    buf = io.BytesIO()
    torch.save(obs.state_dict(), buf)
    buf.seek(0)
    back = TensorObserver.from_state(torch.load(buf, weights_only=True))
    assert back.summary() == obs.summary()
    assert torch.equal(back.group_hist.counts, obs.group_hist.counts)
    assert [float(t) for t in back.search_range(6, False, group=2)] == [float(t) for t in obs.search_range(6, False, group=2)]


def test_non_finite_activation_names_site_and_step():
    obs = TensorObserver("blocks.3.ffn.fc2.input")
    obs.update(torch.randn(2, 4, 8), step=0)
    bad = torch.randn(2, 4, 8)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(UserError, match=r"blocks\.3\.ffn\.fc2\.input at calibration step 7"):
        obs.update(bad, step=7)


def test_bad_groups_are_user_errors():
    obs = TensorObserver("head.input")
    with pytest.raises(UserError, match="one group id per token"):
        obs.update(torch.randn(2, 5, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(UserError, match="non-negative integers"):
        obs.update(torch.randn(2, 5, 8), torch.tensor([0, 1, -1, 0, 0]))
    obs = TensorObserver("head.input")
    obs.update(torch.randn(2, 5, 8), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(UserError, match="some calibration batches but not in others"):
        obs.update(torch.randn(2, 5, 8))
    with pytest.raises(UserError, match="token group 3 was never observed"):
        obs.search_range(8, True, group=3)
    with pytest.raises(UserError, match="no calibration data"):
        TensorObserver("empty").search_range(8, True)
