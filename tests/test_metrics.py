"""evaluation.metrics against closed forms and direct computations."""
import math

import numpy as np
import pytest

from evaluation import metrics as M


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, abs=1e-12)
    # commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 4) ** 2
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_frechet_distance_matches_direct_sqrtm_of_product():
    rng = np.random.default_rng(0)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    # direct: tr sqrt(S1 S2) = sum sqrt(eigenvalues of the (non-symmetric) product)
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(M.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_even_rank_deficient():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 64)) * 3  # fewer samples than dimensions: singular covariance
    assert M.fid_from_features(x, x) < 1e-8
    shift = np.zeros(64)
    shift[:4] = [1, 2, 3, 4]
    assert M.fid_from_features(x, x + shift) == pytest.approx(30.0, rel=1e-9)  # mean shift only
    assert M.fid_from_features(x, 2 * x) > 1.0
    # the covariance route on the same rank-deficient statistics
    assert M.frechet_distance(*M.gaussian_stats(x), *M.gaussian_stats(x)) < 1e-8


def test_sample_space_fid_equals_covariance_fid():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((12, 30)), rng.standard_normal((9, 30)) * 1.5 + 0.3
    direct = M.frechet_distance(*M.gaussian_stats(a), *M.gaussian_stats(b))  # 30x30 route
    assert M.fid_from_features(a, b) == pytest.approx(direct, rel=1e-9)        # 12x9 route
    big_a, big_b = rng.standard_normal((40, 5)), rng.standard_normal((50, 5)) + 1  # N > D: covariance route
    assert M.fid_from_features(big_a, big_b) == pytest.approx(
        M.frechet_distance(*M.gaussian_stats(big_a), *M.gaussian_stats(big_b)))


def test_inception_score_extremes():
    c = 10
    assert M.inception_score(np.full((100, c), 1 / c)) == pytest.approx(1.0)  # uniform: no information
    one_hot = np.eye(c)[np.arange(100) % c]
    assert M.inception_score(one_hot) == pytest.approx(c, rel=1e-9)          # confident and balanced
    assert M.inception_score(np.eye(c)[np.zeros(100, int)]) == pytest.approx(1.0)  # mode collapse
    # two splits: balanced over 2 classes in the first 50, over 5 in the last 50
    p = np.concatenate([np.eye(c)[np.arange(50) % 2], np.eye(c)[np.arange(50) % 5]])
    assert M.inception_score(p, split_size=50) == pytest.approx((2 + 5) / 2, rel=1e-9)


def test_precision_recall_constructed_line():
    real = np.arange(10, dtype=float)[:, None]
    fake = np.concatenate([np.arange(5.0), 100 + np.arange(5.0)])[:, None]
    p, r = M.precision_recall(real, fake, k=3)
    # fakes 0..4 sit on real points, 100..104 are far: precision 1/2.
    # fake radii (3rd neighbour): 0 and 4 -> 3, 1 and 3 -> 2, 2 -> 2; reals 0..7 are within, 8 and 9 are not.
    assert p == pytest.approx(0.5) and r == pytest.approx(0.8)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(2)
    real, fake = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) + 0.7
    k = 3

    def brute(query, ref):
        d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
        radii = np.sort(d_ref, axis=1)[:, k]
        d = np.linalg.norm(query[:, None] - ref[None], axis=-1)
        return np.mean([(d[i] <= radii).any() for i in range(len(query))])

    p, r = M.precision_recall(real, fake, k=k, batch=7)  # batches that do not divide the sets
    assert p == pytest.approx(brute(fake, real)) and r == pytest.approx(brute(real, fake))
    assert 0 < p < 1 and 0 < r < 1


def test_psnr_known_pair():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 16
    out = M.psnr(a, b)
    assert out[0] == pytest.approx(10 * math.log10(255 ** 2 / 256)) and math.isinf(out[1])


def test_ssim_closed_form_and_direct_window():
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a = np.full((1, 16, 16), 100, np.uint8)
    b = np.full((1, 16, 16), 150, np.uint8)
    # constant images: zero variance, SSIM is the luminance term
    assert M.ssim(a, b)[0] == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-9)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (1, 13, 13, 1)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    assert M.ssim(x, x)[0] == pytest.approx(1.0)
    # direct: Gaussian-weighted statistics of each of the 3x3 valid 11x11 windows
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for i in range(3):
        for j in range(3):
            px, py = x[0, i:i + 11, j:j + 11, 0].astype(float), y[0, i:i + 11, j:j + 11, 0].astype(float)
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert M.ssim(x, y)[0] == pytest.approx(np.mean(vals), rel=1e-9)
    assert 0 < M.ssim(x, y)[0] < 0.99
    # masked: only the windows centred in the mask; window (i, j) is centred at pixel (i + 5, j + 5)
    mask = np.zeros((13, 13), bool)
    mask[5, 5:7] = True  # the centres of windows (0, 0) and (0, 1)
    assert M.masked_ssim(x, y, mask) == pytest.approx(np.mean(vals[:2]), rel=1e-9)
    assert M.masked_ssim(x, y, np.ones((13, 13), bool)) == pytest.approx(M.ssim(x, y)[0], rel=1e-12)
    border = np.zeros((13, 13), bool)
    border[0] = True  # no window is centred on the first row
    assert math.isnan(M.masked_ssim(x, y, border))


def test_token_agreement_and_logit_kl():
    import torch

    a = [torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5, 6]])]
    b = [torch.tensor([[1, 0]]), torch.tensor([[3, 4, 0, 6]])]
    assert M.token_agreement(a, b) == pytest.approx(4 / 6)
    assert M.token_agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.token_agreement(np.zeros(3), np.zeros(4))
    # two-way softmax: KL between Bernoullis p = sigmoid(2), q = sigmoid(0) = 1/2
    p = 1 / (1 + math.exp(-2))
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert M.logit_kl([[2.0, 0.0]], [[0.0, 0.0]]) == pytest.approx(kl, rel=1e-12)
    assert M.logit_kl(np.ones((3, 5)), np.ones((3, 5)) + 7) == pytest.approx(0.0, abs=1e-15)  # shift-invariant
    assert M.class_accuracy(np.eye(3)[[0, 1, 2, 0]], [0, 1, 1, 0]) == pytest.approx(0.75)
