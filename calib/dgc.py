"""Distribution-Guided Calibration (DGC): which calibration sequences to keep (method.md §5.2).

The FP model generates N conditional and N unconditional sequences (CFG). DGC looks at one
feature per sequence, the last block's output at token 0, measures how far each sample lies
from its own set's distribution, and keeps N of the 2N sequences.

`dgc_reference` is the reference code, bit for bit: it only sets the cond:uncond ratio and
then keeps the FIRST sequences of each set. Its pinv-Mahalanobis distance degenerates when
N < D (feature dim): for points in general position every distance equals sqrt((N-1)^2/N), so
the split is 50/50; when every uncond feature is identical (RAR/PAR token 0 under a causal
mask) the uncond distances are 0 (or sqrt((N-1)/N) when the float mean is inexact: the
rounding residual is then the one direction pinv inverts) and it keeps conditional sequences
only.

`dgc_ranked` is the documented fix: Ledoit-Wolf shrinkage covariance (well conditioned for
N < D, no hyper-parameter, closed form) and it keeps the samples that really rank highest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import UserError

ALLCLOSE_ATOL = 1e-3  # the reference's tie test between the two sets' distances


@dataclass
class DGCSelection:
    """The kept sequences and why, for the report.

    ``cond``/``uncond`` index the conditional and unconditional sets (ascending);
    ``rho_cond``/``rho_uncond`` are every sample's distance to its own set; ``pct`` is the
    fraction of kept sequences that are conditional; ``shrinkage`` is the Ledoit-Wolf
    intensity of each set (cond, uncond) for the ranked method.
    """

    method: str
    cond: torch.Tensor
    uncond: torch.Tensor
    rho_cond: torch.Tensor
    rho_uncond: torch.Tensor
    pct: float
    reason: str
    shrinkage: tuple[float, float] | None = None

    def kept(self) -> torch.Tensor:
        """Kept indices into the concatenation [cond set; uncond set]."""
        return torch.cat([self.cond, self.uncond + len(self.rho_cond)])

    def summary(self) -> dict:
        def stats(rho):
            return {"min": float(rho.min()), "max": float(rho.max()), "mean": float(rho.mean())}

        out = {"method": self.method, "kept_cond": len(self.cond), "kept_uncond": len(self.uncond),
               "pct": self.pct, "reason": self.reason,
               "rho_cond": stats(self.rho_cond), "rho_uncond": stats(self.rho_uncond)}
        if self.shrinkage is not None:
            out["shrinkage"] = list(self.shrinkage)
        return out


def features(samples: torch.Tensor) -> torch.Tensor:
    """One feature row per sample: ``[N, D]`` as is, ``[N, T, D]`` at token 0 (the reference's choice)."""
    if samples.dim() == 3:
        samples = samples[:, 0, :]
    samples = samples.reshape(samples.shape[0], -1)
    if samples.shape[0] < 2:
        raise UserError(f"DGC needs at least 2 samples per set, got {samples.shape[0]}")
    return samples


def reference_distances(samples: torch.Tensor) -> torch.Tensor:
    """rho_i = sqrt((f_i - mu)^T pinv(S) (f_i - mu)), S = X_c^T X_c / (N - 1) (``mahalanobis_to_distribution``).

    Computed one sample at a time in the input dtype, as the reference does, so that float
    rounding (and hence the allclose test and the top-N ties) matches it; float32 result.
    """
    samples = features(samples)
    centered = samples - samples.mean(dim=0)
    cov_inv = torch.linalg.pinv(centered.T @ centered / (samples.shape[0] - 1))
    return torch.stack([torch.sqrt(d @ cov_inv @ d) for d in centered]).float()


def ledoit_wolf_distances(samples: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mahalanobis distances under the Ledoit-Wolf covariance, and the shrinkage intensity a.

    With X_c the centred features (n x d), S = X_c^T X_c / n and m = tr(S)/d:
        Sigma = (1 - a) S + a m I,   a = min(b, delta) / delta,
        delta = ||S - m I||_F^2 / d,  b = sum_i ||x_i x_i^T - S||_F^2 / (n^2 d)
              = (sum_i ||x_i||^4 / n - ||S||_F^2) / (n d)
    (Ledoit & Wolf 2004; sklearn's ``ledoit_wolf_shrinkage``). ||S||_F^2 comes from the n x n
    Gram matrix. Sigma is positive definite as soon as a > 0, which it is for n < d unless the
    samples are degenerate; identical samples (m = 0) all get distance 0.
    """
    x = features(samples).double()
    n, d = x.shape
    centered = x - x.mean(dim=0)
    gram = centered @ centered.T
    m = float(gram.trace()) / (n * d)
    if m == 0:
        return torch.zeros(n), 0.0
    s_frob2 = float(gram.pow(2).sum()) / n**2
    delta = (s_frob2 - d * m**2) / d
    beta = (float(gram.diagonal().pow(2).sum()) / n - s_frob2) / (n * d)
    shrink = min(beta, delta) / delta if delta > 0 else 0.0
    sigma = (1 - shrink) * centered.T @ centered / n + shrink * m * torch.eye(d, dtype=torch.float64)
    rho2 = ((centered @ torch.linalg.pinv(sigma, hermitian=True)) * centered).sum(dim=1)
    return rho2.clamp(min=0).sqrt().float(), shrink


def _check_sets(feats_cond: torch.Tensor, feats_uncond: torch.Tensor, n_keep: int | None) -> int:
    n = feats_cond.shape[0]
    if feats_uncond.shape[0] != n:
        raise UserError(f"DGC needs as many unconditional as conditional samples, got {feats_uncond.shape[0]} and {n}")
    n_keep = n if n_keep is None else n_keep
    if not 0 < n_keep <= n:
        raise UserError(f"DGC keeps between 1 and N={n} samples, got n_keep={n_keep}")
    return n_keep


def _reference_pct(rho_cond: torch.Tensor, rho_uncond: torch.Tensor, n_top: int) -> tuple[float, str]:
    """pct = 0.5 if allclose(rho_cond, rho_uncond, atol=1e-3), else the cond fraction of the top-n_top of both."""
    if torch.allclose(rho_cond, rho_uncond, atol=ALLCLOSE_ATOL):
        return 0.5, f"cond and uncond distances agree within {ALLCLOSE_ATOL:g}: 50/50 split"
    _, top = torch.topk(torch.cat([rho_cond, rho_uncond]), n_top)
    n_cond = int((top < len(rho_cond)).sum())
    return n_cond / n_top, f"{n_cond} of the {n_top} largest distances are conditional"


def dgc_reference(feats_cond: torch.Tensor, feats_uncond: torch.Tensor, n_keep: int | None = None,
                  *, batch: int | None = None) -> DGCSelection:
    """The reference selection (``*_cali_dgc.py``), including its degenerate cases.

    Distances by `reference_distances` per set; pct by `_reference_pct` over the top
    ``n_keep`` (default N, as in the reference); then keep the FIRST round(pct·n_keep)
    conditional and the FIRST n_keep - round(pct·n_keep) unconditional sequences (Python's
    round, half to even). ``batch`` reproduces VAR/PAR, which apply the split per calibration
    batch: each of the N/batch batches keeps its first round(pct·batch) cond and the rest
    uncond (n_keep must then be N).
    """
    n_keep = _check_sets(feats_cond, feats_uncond, n_keep)
    rho_cond, rho_uncond = reference_distances(feats_cond), reference_distances(feats_uncond)
    pct, reason = _reference_pct(rho_cond, rho_uncond, n_keep)
    n = feats_cond.shape[0]
    if batch is None:
        n_cond = round(pct * n_keep)
        cond, uncond = torch.arange(n_cond), torch.arange(n_keep - n_cond)
    else:
        if n_keep != n or n % batch:
            raise UserError(f"DGC per batch keeps N={n} of 2N in batches that divide N; got n_keep={n_keep}, batch={batch}")
        n_cond = round(pct * batch)
        starts = torch.arange(0, n, batch)
        cond = (starts[:, None] + torch.arange(n_cond)).flatten()
        uncond = (starts[:, None] + torch.arange(batch - n_cond)).flatten()
    return DGCSelection("reference", cond, uncond, rho_cond, rho_uncond, pct, reason)


def dgc_ranked(feats_cond: torch.Tensor, feats_uncond: torch.Tensor, n_keep: int | None = None) -> DGCSelection:
    """Keep the ``n_keep`` (default N) samples of both sets that lie farthest from their own set.

    Distances are Mahalanobis under each set's Ledoit-Wolf covariance (`ledoit_wolf_distances`)
    rather than pinv of the sample covariance: with N < D the latter gives every sample the
    same distance (method.md §5.2), so the reference cannot rank. Shrinkage was chosen over
    PCA because it needs no choice of rank and reduces to the plain Mahalanobis distance when
    N >> D. Ties are broken by index, conditional first.
    """
    n_keep = _check_sets(feats_cond, feats_uncond, n_keep)
    rho_cond, shrink_cond = ledoit_wolf_distances(feats_cond)
    rho_uncond, shrink_uncond = ledoit_wolf_distances(feats_uncond)
    n = len(rho_cond)
    order = torch.sort(torch.cat([rho_cond, rho_uncond]), descending=True, stable=True).indices[:n_keep]
    cond, uncond = order[order < n].sort().values, (order[order >= n] - n).sort().values
    reason = f"kept the {n_keep} samples farthest from their own set's distribution ({len(cond)} conditional)"
    return DGCSelection("ledoit-wolf", cond, uncond, rho_cond, rho_uncond, len(cond) / n_keep, reason,
                        (shrink_cond, shrink_uncond))
