"""Codebook-frequency resampling of calibration tokens (Shift-and-Sum, method.md §12.3).

The FP model's sampled token maps over-represent some codes and miss others. For one scale
(``B`` samples x ``L`` tokens, ``N = B·L``) resampling moves the code counts to the model's
expected frequencies ``p̂_k·N`` by redrawing the over-sampled codes' tokens among the
under-sampled codes. The caller loops over scales, keeping the per-sample generators across
scales, and then feeds the new token maps back teacher-forced; the probabilities of later
scales stay those computed on the original samples, as in the reference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from core.errors import UserError
from core.progress import no_progress

GENERATOR_SEED_OFFSET = 10000  # per-sample generator seed = seed + 10000 + label (the reference's)


def sample_generators(labels: Sequence[int] | torch.Tensor, seed: int) -> list[torch.Generator]:
    """One CPU generator per calibration sample, seeded ``seed + 10000 + label`` as the reference does."""
    return [torch.Generator().manual_seed(seed + GENERATOR_SEED_OFFSET + int(label)) for label in labels]


def code_targets(prob_mean: torch.Tensor, n: int) -> torch.Tensor:
    """Largest-remainder apportionment of n tokens to V codes.

    target_k = floor(p̂_k·n); the n - sum(target) codes with the largest fractional parts get
    one more. If float rounding makes sum(floor) exceed n (the reference then misses its
    targets), the codes with the smallest fractional parts among target_k > 0 give one back.
    """
    scaled = prob_mean * n
    target = scaled.floor().long()
    frac = scaled - target.to(scaled.dtype)
    remainder = n - int(target.sum())
    if remainder > 0:
        target[torch.topk(frac, remainder).indices] += 1
    elif remainder < 0:
        surplus = torch.where(target > 0, frac, torch.full_like(frac, float("inf")))
        target[torch.topk(surplus, -remainder, largest=False).indices] -= 1
    return target


def _check(prob: torch.Tensor, codes: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    if prob.dim() != 3 or codes.shape != prob.shape[:2]:
        raise UserError(f"resample needs prob [B, L, V] and codes [B, L], got {list(prob.shape)} and {list(codes.shape)}")
    if len(generators) != prob.shape[0]:
        raise UserError(f"resample needs one generator per sample: {len(generators)} for {prob.shape[0]} samples")
    sums = prob.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise UserError(f"resample: token probabilities must sum to 1, row sums lie in [{float(sums.min()):.4g}, {float(sums.max()):.4g}]")
    if codes.numel() and not 0 <= int(codes.min()) <= int(codes.max()) < prob.shape[-1]:
        raise UserError(f"resample: codes must lie in [0, {prob.shape[-1]}), got [{int(codes.min())}, {int(codes.max())}]")


def _redraw(prob_token: torch.Tensor, under: list[int], generator: torch.Generator) -> int:
    """Draw from prob masked to the under-sampled codes; uniform over them when that mass is 0."""
    mask = torch.zeros_like(prob_token)
    mask[under] = 1
    masked = prob_token * mask
    if masked.sum().item() == 0:
        masked = mask
    return int(torch.multinomial(masked, 1, generator=generator))


def resample_codes(prob: torch.Tensor, codes: torch.Tensor,
                   generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict]:
    """Resample one scale's token map so that every code's count equals its target (method.md §12.3).

    ``prob [B, L, V]``: per-token probabilities (CFG-combined, after top-k/top-p, softmaxed);
    ``codes [B, L]``: the sampled codes; ``generators``: one per sample (`sample_generators`).

    targets = `code_targets`(mean_{b,l} prob[b, l], N); excess = max(count - target, 0),
    shortage = max(target - count, 0). For each over-sampled code c (ascending), its excess_c
    tokens with the largest probability mass on the under-sampled set (ties: first position)
    are redrawn one by one with `_redraw` using their sample's generator; a code leaves the
    under-sampled set when its shortage is filled. Since sum(excess) = sum(shortage), every
    count ends exactly on its target. Tokens of codes that are not over-sampled are untouched.
    Returns the new codes and a summary.
    """
    _check(prob, codes, generators)
    vocab = prob.shape[-1]
    target = code_targets(prob.mean(dim=(0, 1)), codes.numel())
    count = torch.bincount(codes.flatten(), minlength=vocab)
    excess, shortage = (count - target).clamp(min=0), (target - count).clamp(min=0)
    under = shortage.nonzero().flatten().tolist()
    over = excess.nonzero().flatten().tolist()
    summary = {"tokens": codes.numel(), "codes": vocab, "over_codes": len(over), "under_codes": len(under),
               "reassigned": int(excess.sum()), "l1_before": int((count - target).abs().sum())}
    out = codes.clone()
    for c in over:
        where = (out == c).nonzero()
        mass = prob[where[:, 0], where[:, 1]][:, under].sum(dim=-1)
        chosen = where[torch.argsort(mass, descending=True, stable=True)[: int(excess[c])]]
        for b, pos in chosen.tolist():
            new = _redraw(prob[b, pos], under, generators[b])
            out[b, pos] = new
            shortage[new] -= 1
            if shortage[new] == 0:
                under.remove(new)
    summary["l1_after"] = int((torch.bincount(out.flatten(), minlength=vocab) - target).abs().sum())
    return out, summary


# -- resampling self-generated calibration (tools.compile --resample) --

RESAMPLED_FAMILIES = ("var",)  # next-scale token maps: pn² tokens per scale and sample (method.md §12.5)


def resample_generations(bundle, classes: list[int], seed: int, *, batch: int = 4,
                         progress=no_progress) -> tuple[list[torch.Tensor], list[dict]]:
    """Resampled token maps of the FP model's generations of ``classes``: (per scale ``[N, pn²]``, summaries).

    Runs the family driver once per generation batch as ``calib.capture.capture`` does (same
    batches, same seeds, so the same samples), records every scale's sampling distribution,
    then resamples each scale over all N samples (`resample_codes`) with one generator per
    sample kept across scales. The probabilities of later scales are those of the original
    samples, as in the reference. Memory: N·L·V floats of probabilities (L tokens per image).
    The caller replays the driver teacher-forced on the returned maps (``fixed_tokens``).
    """
    if bundle.family not in RESAMPLED_FAMILIES:
        raise UserError(f"--resample: codebook resampling is built for next-scale token maps "
                        f"({', '.join(RESAMPLED_FAMILIES)}), not for the {bundle.family} family")
    generate = bundle.extra.get("generate")
    if generate is None:
        raise UserError(f"{bundle.name}: this model has no generation driver to resample")
    probs: dict[int, list[torch.Tensor]] = {}
    codes: dict[int, list[torch.Tensor]] = {}
    batches = [classes[i:i + batch] for i in range(0, len(classes), batch)]
    for i, labels in enumerate(progress(batches, desc="sampling for resampling", unit="batch")):
        with torch.no_grad():
            tokens = generate(torch.tensor(labels), seed + i,
                              on_probs=lambda si, p: probs.setdefault(si, []).append(p.detach().float().cpu()))
        for si, t in enumerate(tokens):
            codes.setdefault(si, []).append(t.cpu())
    generators = sample_generators(classes, seed)
    maps, summaries = [], []
    for si in progress(sorted(codes), desc="resampling scales", unit="scale"):
        new, summary = resample_codes(torch.cat(probs[si]), torch.cat(codes[si]), generators)
        if summary["l1_after"] != 0:  # the construction guarantees it; a miss is a bug, not bad input
            raise RuntimeError(f"resampling missed its targets at scale {si}: L1 {summary['l1_after']}")
        maps.append(new)
        summaries.append({"scale": si, **summary})
    return maps, summaries
