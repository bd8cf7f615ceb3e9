"""Image-generation metrics: FID, Inception Score, precision/recall, and fidelity to the FP model.

Distribution metrics work on feature arrays (any feature network: Inception pool features or the
MNIST classifier's penultimate layer); fidelity metrics compare two generations made from the
same classes and seeds (FP vs quantized). Statistics are float64 numpy; no scipy.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Fréchet distance / FID


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off zeroed: eigh is accurate to ~eps * |max eigenvalue|,
    and the square root would turn that noise into ~sqrt(eps) per null direction (rank-deficient
    covariances have hundreds of them)."""
    tol = np.finfo(np.float64).eps * len(w) * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigendecomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_psd_eigvals(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``.

    ``tr((S1 S2)^{1/2})`` is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``S1^{1/2} S2 S1^{1/2}`` (same spectrum as ``S1 S2``), so there is no complex
    round-off and no singular-matrix failure for rank-deficient covariances (fewer samples than
    dimensions), where ``scipy.linalg.sqrtm`` needs an epsilon offset.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(d, 0.0)  # round-off can leave -1e-12 for identical sets


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID of two feature sets ``[N, D]``.

    With fewer samples than dimensions (a quick FID-1k on 2048-d Inception features) it works in
    sample space: with centred features A, B, ``tr((S_A S_B)^{1/2})`` is the sum of singular values
    of ``A B^T / sqrt((n_A - 1)(n_B - 1))``, an ``n_A x n_B`` matrix instead of ``D x D``
    eigendecompositions, and exact without eigenvalue clipping.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N >= 2, D] feature sets of the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    mu_a, mu_b = a.mean(0), b.mean(0)
    a0, b0 = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    tr_covmean = np.linalg.svd(a0 @ b0.T, compute_uv=False).sum() / np.sqrt(na * nb)
    d = float(((mu_a - mu_b) ** 2).sum() + (a0 ** 2).sum() / na + (b0 ** 2).sum() / nb - 2 * tr_covmean)
    return max(d, 0.0)


# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` from class probabilities ``[N, C]``, averaged over splits of
    ``split_size`` (5,000 as in the ADM evaluator). Ranges from 1 (one class, or uniform predictions)
    to C (confident and balanced)."""
    p = np.asarray(probs, dtype=np.float64)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(marginal + 1e-30))).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# Precision / recall (Kynkäänniemi et al. 2019)


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(0)


def knn_radii(feats: np.ndarray, k: int = 3, batch: int = 1000) -> np.ndarray:
    """Squared distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, got {len(x)}")
    out = []
    for i in range(0, len(x), batch):
        d = _pairwise_sq(x[i:i + batch], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the smallest is the point itself (0)
    return torch.cat(out).numpy()


def manifold_coverage(query: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray, batch: int = 1000) -> float:
    """Fraction of ``query`` points inside at least one ``ref`` k-NN ball."""
    q = torch.as_tensor(np.asarray(query), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    radii = torch.as_tensor(ref_radii, dtype=torch.float64)
    inside = []
    for i in range(0, len(q), batch):
        inside.append((_pairwise_sq(q[i:i + batch], r) <= radii[None]).any(1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1000) -> tuple[float, float]:
    """Precision: fake samples inside the real manifold; recall: real samples inside the fake one."""
    precision = manifold_coverage(fake, real, knn_radii(real, k, batch), batch)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, batch), batch)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# Fidelity to the FP model (same classes and seeds)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB of two ``[N, ...]`` image batches (inf where identical)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB of two NHWC (or NHW) batches over the pixels where ``mask [H, W]`` is true, all
    images and channels pooled into one MSE (inf where identical, nan for an empty mask). Edits
    score their kept region against the input's reconstruction with it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mask = np.asarray(mask, bool)
    if a.shape != b.shape or a.shape[1:3] != mask.shape:
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}, mask {mask.shape}")
    if not mask.any():
        return float("nan")
    mse = float(((a - b) ** 2)[:, mask].mean())
    return float(10 * np.log10(data_range ** 2 / mse)) if mse > 0 else float("inf")


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, win: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004) of NHWC (or NHW) batches: Gaussian 11x11 window with sigma
    1.5, K1 = 0.01, K2 = 0.03, mean over valid windows and channels. Images smaller than the window
    use a window of their size."""
    s = _ssim_map(a, b, data_range, win, sigma)
    return s.reshape(s.shape[0], -1).mean(1).numpy()


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 255.0, win: int = 11,
                sigma: float = 1.5) -> float:
    """``ssim`` over the windows whose centre pixel lies where ``mask [H, W]`` is true, all images
    pooled (nan when no window is centred there). Edits score their regenerated region with it."""
    s = _ssim_map(a, b, data_range, win, sigma)  # [N, C, h, w], window (i, j) centred at (i + r, j + r)
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(np.asarray(a).shape[1:3]):
        raise ValueError(f"mask {mask.shape} does not match images {np.asarray(a).shape}")
    r = (mask.shape[0] - s.shape[2]) // 2  # the window's radius (square windows)
    centres = torch.from_numpy(mask[r: r + s.shape[2], r: r + s.shape[3]].copy())
    if not centres.any():
        return float("nan")
    return float(s[:, :, centres].mean())


def _ssim_map(a, b, data_range: float, win: int, sigma: float) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    if x.ndim == 3:
        x, y = x[..., None], y[..., None]
    x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)
    _, c, h, w = x.shape
    win = min(win, h, w)
    kernel = _gaussian_window(win, sigma)[None, None].expand(c, 1, win, win)

    def filt(t):
        return F.conv2d(t, kernel, groups=c)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def token_agreement(tokens_a, tokens_b) -> float:
    """Fraction of identical sampled tokens; tensors or lists of tensors (VAR's scales)."""
    if isinstance(tokens_a, (list, tuple)):
        if len(tokens_a) != len(tokens_b):
            raise ValueError(f"token lists differ in length: {len(tokens_a)} vs {len(tokens_b)}")
        eq = [torch.as_tensor(x).flatten() == torch.as_tensor(y).flatten() for x, y in zip(tokens_a, tokens_b)]
        return float(torch.cat(eq).double().mean())
    a, b = torch.as_tensor(np.asarray(tokens_a)), torch.as_tensor(np.asarray(tokens_b))
    if a.shape != b.shape:
        raise ValueError(f"token shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b).double().mean())


def continuous_token_fidelity(tokens_ref, tokens_test) -> dict:
    """Continuous tokens ``[..., C]`` (MAR's latents): ``token_cosine``, the mean cosine similarity of
    paired token vectors, and ``token_rel_mse``, the MSE relative to the reference's mean square."""
    a, b = (torch.as_tensor(np.asarray(t), dtype=torch.float64) for t in (tokens_ref, tokens_test))
    if a.shape != b.shape:
        raise ValueError(f"token shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    return {"token_cosine": float(cos.mean()), "token_rel_mse": float(((a - b) ** 2).mean() / (a ** 2).mean())}


def logit_kl(logits_ref, logits_test) -> float:
    """Mean over positions of ``KL(softmax(ref) || softmax(test))`` over the last (vocabulary) axis, nats."""
    p = torch.as_tensor(np.asarray(logits_ref), dtype=torch.float64).log_softmax(-1)
    q = torch.as_tensor(np.asarray(logits_test), dtype=torch.float64).log_softmax(-1)
    if p.shape != q.shape:
        raise ValueError(f"logit shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    return float((p.exp() * (p - q)).sum(-1).mean())


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose predicted class is the requested one."""
    return float((np.asarray(probs).argmax(-1) == np.asarray(labels)).mean())
