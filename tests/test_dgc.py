"""DGC selection (calib/dgc.py): the reference's exact behaviour, and the ranked variant."""
from __future__ import annotations

import json
import math

import pytest
import torch

from calib.dgc import dgc_ranked, dgc_reference, ledoit_wolf_distances, reference_distances
from core.errors import UserError


def _col(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, None]


def test_reference_hand_case():
    """1-d features. cond: mean 0, S = 16/3, every rho = 2/sqrt(16/3) = 0.866.
    uncond: mean 1, S = 12/3 = 4, rho = [0.5, 0.5, 0.5, 1.5]. The 4 largest of the 8 are 1.5
    (uncond) and three 0.866 (cond): pct = 3/4, keep cond 0,1,2 and uncond 0."""
    sel = dgc_reference(_col([-2, -2, 2, 2]), _col([0, 0, 0, 4]))
    torch.testing.assert_close(sel.rho_cond, torch.full((4,), math.sqrt(0.75)))
    torch.testing.assert_close(sel.rho_uncond, torch.tensor([0.5, 0.5, 0.5, 1.5]))
    assert sel.pct == 0.75
    assert sel.cond.tolist() == [0, 1, 2] and sel.uncond.tolist() == [0]
    assert sel.kept().tolist() == [0, 1, 2, 4]
    json.dumps(sel.summary())


def test_reference_allclose_gives_half():
    """Shifting a set leaves its distances unchanged: allclose, pct = 0.5 whatever the ranking."""
    cond = _col([-3, -1, 0.5, 4])
    sel = dgc_reference(cond, cond + 7)
    assert sel.pct == 0.5 and "agree" in sel.reason
    assert sel.cond.tolist() == [0, 1] and sel.uncond.tolist() == [0, 1]


def test_reference_per_batch_uses_round_half_even():
    """N = 8 in batches of 4 (VAR/PAR). cond rho = sqrt(7/8) = 0.935 for all; uncond [0 x5, 6 x3]:
    mean 2.25, S = 67.5/7, rho = 0.725 (x5) and 1.208 (x3). Top 8: three uncond, five cond,
    pct = 5/8. Whole set: keep 5 cond + 3 uncond. Per batch: round(2.5) = 2 cond + 2 uncond each."""
    cond, uncond = _col([-2, -2, 2, 2] * 2), _col([0] * 5 + [6] * 3)
    whole = dgc_reference(cond, uncond)
    assert whole.pct == 0.625
    assert whole.cond.tolist() == [0, 1, 2, 3, 4] and whole.uncond.tolist() == [0, 1, 2]
    batched = dgc_reference(cond, uncond, batch=4)
    assert batched.cond.tolist() == [0, 1, 4, 5] and batched.uncond.tolist() == [0, 1, 4, 5]


def test_reference_degenerate_when_fewer_samples_than_dims():
    """N < D, points in general position: every rho = (N-1)/sqrt(N) in both sets, so a 50/50 split."""
    g = torch.Generator().manual_seed(0)
    n, d = 8, 32
    cond, uncond = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * 5 + 1
    sel = dgc_reference(cond, uncond)
    torch.testing.assert_close(sel.rho_cond, torch.full((n,), (n - 1) / math.sqrt(n)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sel.rho_uncond, torch.full((n,), (n - 1) / math.sqrt(n)), rtol=1e-4, atol=1e-4)
    assert sel.pct == 0.5 and sel.cond.tolist() == [0, 1, 2, 3] and sel.uncond.tolist() == [0, 1, 2, 3]


def test_reference_keeps_only_cond_when_uncond_token0_is_constant():
    """RAR/PAR: token 0 of every uncond sequence is identical, S = 0, pinv = 0, rho = 0: pct = 1.

    Small integers keep the float mean exact. Otherwise the mean's rounding leaves one
    identical residual e in every row, S = (N/(N-1)) e e^T, and rho = sqrt((N-1)/N): still far
    below the cond distances, so the outcome is the same.
    """
    g = torch.Generator().manual_seed(1)
    n, t, d = 8, 3, 32
    cond = torch.randn(n, t, d, generator=g)
    uncond = torch.randn(n, t, d, generator=g)
    uncond[:, 0] = torch.randint(-4, 5, (d,), generator=g).float()  # same token-0 feature everywhere
    sel = dgc_reference(cond, uncond)
    assert torch.equal(sel.rho_uncond, torch.zeros(n))
    assert sel.pct == 1.0 and sel.cond.tolist() == list(range(n)) and sel.uncond.tolist() == []
    uncond[:, 0] = torch.randn(d, generator=g)  # inexact mean
    sel = dgc_reference(cond, uncond)
    torch.testing.assert_close(sel.rho_uncond, torch.full((n,), math.sqrt((n - 1) / n)))
    assert sel.pct == 1.0 and sel.uncond.tolist() == []


def test_reference_reads_token_zero_only():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 4, 3, generator=g)
    noisy = feats.clone()
    noisy[:, 1:] = torch.randn(6, 3, 3, generator=g)
    torch.testing.assert_close(reference_distances(noisy), reference_distances(feats[:, 0]))


def _ledoit_wolf_direct(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf from its definition, one outer product per sample (no shortcut)."""
    x = x.double()
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    m = torch.trace(s) / d
    delta = (s - m * torch.eye(d, dtype=torch.float64)).pow(2).sum() / d
    beta = sum((torch.outer(r, r) - s).pow(2).sum() for r in xc) / (n**2 * d)
    a = min(beta, delta) / delta
    sigma = (1 - a) * s + a * m * torch.eye(d, dtype=torch.float64)
    return ((xc @ torch.linalg.inv(sigma)) * xc).sum(1).sqrt().float()


@pytest.mark.parametrize("n,d", [(40, 5), (10, 24)])
def test_ledoit_wolf_distances_match_definition(n, d):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * torch.linspace(0.5, 3, d)
    rho, shrink = ledoit_wolf_distances(x)
    assert 0 < shrink <= 1
    torch.testing.assert_close(rho, _ledoit_wolf_direct(x), rtol=1e-5, atol=1e-6)


def test_ranked_keeps_exactly_the_top_k_and_really_ranks():
    g = torch.Generator().manual_seed(3)
    n, d = 16, 64
    cond, uncond = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    cond[[2, 9]] *= 4  # two far samples in each set
    uncond[[5, 11]] *= 4
    sel = dgc_ranked(cond, uncond, n_keep=10)
    rho = torch.cat([sel.rho_cond, sel.rho_uncond])
    kept = torch.zeros(2 * n, dtype=torch.bool)
    kept[sel.kept()] = True
    assert int(kept.sum()) == 10
    assert rho[kept].min() >= rho[~kept].max()
    assert {2, 9} <= set(sel.cond.tolist()) and {5, 11} <= set(sel.uncond.tolist())
    assert sel.rho_cond.std() > 0.1  # the reference's distances would all be 15/4 here
    assert sel.pct == len(sel.cond) / 10 and sel.method == "ledoit-wolf"
    json.dumps(sel.summary())


def test_identical_samples_get_distance_zero():
    rho, shrink = ledoit_wolf_distances(torch.ones(5, 7))
    assert torch.equal(rho, torch.zeros(5)) and shrink == 0.0


def test_bad_sets_are_user_errors():
    with pytest.raises(UserError, match="as many unconditional"):
        dgc_reference(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(UserError, match="between 1 and N=4"):
        dgc_ranked(torch.randn(4, 3), torch.randn(4, 3), n_keep=5)
    with pytest.raises(UserError, match="batches that divide N"):
        dgc_reference(torch.randn(6, 3), torch.randn(6, 3), batch=4)
    with pytest.raises(UserError, match="at least 2 samples"):
        dgc_reference(torch.randn(1, 3), torch.randn(1, 3))
