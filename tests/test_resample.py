"""Codebook-frequency resampling (calib/resample.py, method.md §12.3)."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.resample import code_targets, resample_codes, sample_generators
from core.errors import UserError


def _case(seed: int, batch: int, tokens: int, vocab: int, top_k: int, from_prob: bool):
    """Softmaxed random logits cut to the top_k codes of each token; codes sampled from prob or arbitrary."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, tokens, vocab, generator=g) * 2
    kth = logits.topk(min(top_k, vocab), dim=-1).values[..., -1:]
    prob = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
    if from_prob:
        codes = torch.multinomial(prob.reshape(-1, vocab), 1, generator=g).reshape(batch, tokens)
    else:
        codes = torch.randint(0, max(1, vocab // 3), (batch, tokens), generator=g)  # skewed on purpose
    return prob, codes


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), tokens=st.integers(1, 12),
       vocab=st.integers(2, 16), top_k=st.integers(1, 16), from_prob=st.booleans())
def test_resampling_reaches_targets_and_only_moves_excess(seed, batch, tokens, vocab, top_k, from_prob):
    prob, codes = _case(seed, batch, tokens, vocab, top_k, from_prob)
    target = code_targets(prob.mean(dim=(0, 1)), codes.numel())
    count = torch.bincount(codes.flatten(), minlength=vocab)
    excess = (count - target).clamp(min=0)

    new, summary = resample_codes(prob, codes, sample_generators(range(batch), seed=7))

    assert torch.equal(torch.bincount(new.flatten(), minlength=vocab), target)
    assert summary["l1_after"] == 0 and summary["reassigned"] == int(excess.sum())
    changed = new != codes
    assert torch.equal(changed, changed & (excess[codes] > 0))  # codes not over-sampled are untouched
    assert set(new[changed].tolist()) <= set((target > count).nonzero().flatten().tolist())
    shortage = (target - count).clamp(min=0)
    for c in excess.nonzero().flatten().tolist():  # over codes in the order they are processed
        moved = changed & (codes == c)
        assert int(moved.sum()) == int(excess[c])
        under = shortage.nonzero().flatten().tolist()  # the under set when c's turn comes
        assert set(new[moved].tolist()) <= set(under)
        mass = prob[..., under].sum(-1)  # the tokens moved carry the most mass on it
        stayed = (codes == c) & ~changed
        if stayed.any():
            assert mass[moved].min() >= mass[stayed].max()
        shortage -= torch.bincount(new[moved], minlength=vocab)
    again, _ = resample_codes(prob, codes, sample_generators(range(batch), seed=7))
    assert torch.equal(again, new)
    json.dumps(summary)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 40), n=st.integers(0, 500))
def test_targets_are_the_largest_remainder_apportionment(seed, vocab, n):
    p = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3, 0)
    target = code_targets(p, n)
    scaled = p * n
    assert int(target.sum()) == n
    bumped = target - scaled.floor().long()
    assert set(bumped.tolist()) <= {0, 1}
    frac = scaled - scaled.floor()
    if 0 < bumped.sum() < vocab:
        assert frac[bumped == 1].min() >= frac[bumped == 0].max()


def test_zero_mass_token_is_redrawn_uniformly_over_the_under_set():
    """p̂ = [2, 1, 2]/5 over 5 tokens: targets [2, 1, 2]; counts [3, 0, 2]. Code 0 has one token
    too many and none of its tokens can emit code 1: the first (A) is redrawn uniformly over {1}."""
    prob = torch.tensor([[[1, 0, 0], [1, 0, 0], [0, .5, .5], [0, .5, .5], [0, 0, 1]]], dtype=torch.float32)
    codes = torch.tensor([[0, 0, 2, 2, 0]])
    new, summary = resample_codes(prob, codes, sample_generators([3], seed=0))
    assert new.tolist() == [[1, 0, 2, 2, 0]]
    assert summary["over_codes"] == 1 and summary["under_codes"] == 1 and summary["reassigned"] == 1


def test_generators_follow_the_reference_seeding():
    gens = sample_generators(torch.tensor([5, 9]), seed=2025)
    assert [g.initial_seed() for g in gens] == [2025 + 10000 + 5, 2025 + 10000 + 9]


def test_bad_inputs_are_user_errors():
    prob, codes = _case(0, 2, 3, 4, 4, True)
    with pytest.raises(UserError, match="one generator per sample"):
        resample_codes(prob, codes, sample_generators([0], seed=0))
    with pytest.raises(UserError, match="must sum to 1"):
        resample_codes(prob * 2, codes, sample_generators([0, 1], seed=0))
    with pytest.raises(UserError, match=r"codes must lie in \[0, 4\)"):
        resample_codes(prob, codes + 4, sample_generators([0, 1], seed=0))
    with pytest.raises(UserError, match=r"prob \[B, L, V\]"):
        resample_codes(prob[0], codes[0], sample_generators([0], seed=0))
