"""frontends.sampling: torch.multinomial's draws without its host syncs; top-k / top-p filtering in one sort."""
import pytest
import torch

from frontends.sampling import check_probs, filter_top_k_top_p, image_generators, multinomial_rows, zero_cache

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _probs(shape, seed, device, dtype=torch.float32):
    """Peaked distributions with most entries zero, as top-k / top-p filtering leaves them."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * 3
    logits[logits < logits.quantile(0.7)] = -torch.inf
    return logits.softmax(-1).to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 7, 300), (6, 50)], ids=["tokens", "one-row"])
def test_same_tokens_as_torch_multinomial(device, shape):
    probs = _probs(shape, 0, device)
    ours_gens, torch_gens = image_generators(11, shape[0], device), image_generators(11, shape[0], device)
    for _ in range(3):  # the generators advance as torch.multinomial advances them
        ours = multinomial_rows(probs, ours_gens)
        expected = torch.stack([torch.multinomial(p, 1, replacement=True, generator=g)[..., 0]
                                for p, g in zip(probs, torch_gens)])
        assert ours.shape == shape[:-1] and torch.equal(ours, expected)
    assert len(set(ours.flatten().tolist())) > 3  # the draws differ between positions
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours_gens, torch_gens))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 probabilities)")
def test_half_probabilities_on_gpu():
    probs = _probs((4, 9, 500), 1, "cuda", torch.float16)
    ours = multinomial_rows(probs, image_generators(2, 4, "cuda"))
    expected = torch.stack([torch.multinomial(p, 1, generator=g)[:, 0] for p, g in zip(probs, image_generators(2, 4, "cuda"))])
    assert torch.equal(ours, expected)


def test_draws_only_where_probability_is_positive():
    probs = _probs((8, 16, 64), 2, "cpu")
    tokens = multinomial_rows(probs, image_generators(0, 8))
    assert bool((probs.gather(-1, tokens[..., None]) > 0).all())


@pytest.mark.parametrize("bad", ["nan", "negative", "zero row"])
def test_bad_probabilities_are_refused(bad):
    probs = _probs((2, 3, 10), 3, "cpu")
    if bad == "nan":
        probs[0, 1, 2] = torch.nan
    elif bad == "negative":
        probs[1, 0, 0] = -0.1
    else:
        probs[1, 2] = 0
    with pytest.raises(RuntimeError, match="probabilities contain"):
        multinomial_rows(probs, image_generators(0, 2))
    flags, good = [], []  # deferred: no error (nor host sync) at the draw, one at the check
    tokens = multinomial_rows(probs, image_generators(0, 2), bad=flags)
    assert tokens.shape == (2, 3) and bool(((tokens >= 0) & (tokens < 10)).all())
    multinomial_rows(_probs((2, 3, 10), 3, "cpu"), image_generators(0, 2), bad=good)
    check_probs(good)
    with pytest.raises(RuntimeError, match="probabilities contain"):
        check_probs(good + flags)
    with pytest.raises(ValueError):  # one generator per image
        multinomial_rows(_probs((2, 3, 10), 3, "cpu"), image_generators(0, 3))


def _official(logits, top_k, top_p, rule):
    """The official order: top-k by ``topk``, then a sort of the filtered logits for the nucleus (VAR's
    ``sample_with_top_k_top_p_``, HF's ``TopPLogitsWarper`` for LlamaGen)."""
    if top_k > 0:
        logits = logits.masked_fill(logits < logits.topk(min(top_k, logits.shape[-1])).values[..., -1:], -torch.inf)
    if rule == "var" and top_p > 0:
        ascending, order = logits.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    if rule == "hf" and top_p < 1:
        descending, order = logits.sort(dim=-1, descending=True)
        drop = descending.softmax(-1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return logits


@pytest.mark.parametrize("rule", ["var", "hf"])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (20, 0.0), (20, 1.0), (20, 0.9), (64, 0.96), (100, 0.3)])
def test_filter_is_the_official_two_pass_filter(rule, top_k, top_p):
    logits = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(top_k)) * 2
    ours = filter_top_k_top_p(logits, top_k, top_p, rule=rule)
    assert torch.equal(ours, _official(logits, top_k, top_p, rule))
    kept = (ours > -torch.inf).sum(-1)
    assert kept.min() >= 1 and kept.max() <= (top_k if 0 < top_k < 64 else 64)
    if 0 < top_p < 1:
        assert kept.float().std() > 0  # the nucleus changes from row to row


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]]).half()  # k = 2: the 2s tie
    for top_p in (0.0, 0.99):
        ours = filter_top_k_top_p(logits, 2, top_p)
        assert torch.isinf(ours).tolist() == [[False, True, False, False, True]]


def test_unknown_nucleus_rule_is_refused():
    with pytest.raises(ValueError, match="nucleus rule"):
        filter_top_k_top_p(torch.zeros(2, 5), 2, 0.5, rule="topp")


def test_zero_cache_is_one_broadcast_zero():
    """No memory and no fill until a step writes it, out of place, as the steps do."""
    like = torch.ones(3, dtype=torch.float16)
    cache = zero_cache(like, (2, 4, 5))
    assert cache.shape == (2, 4, 5) and cache.dtype == torch.float16 and cache.untyped_storage().nbytes() == 2
    assert torch.equal(cache, torch.zeros(2, 4, 5, dtype=torch.float16))
    written = cache.index_copy(1, torch.tensor([1]), torch.ones(2, 1, 5, dtype=torch.float16))
    assert written.sum((0, 2)).tolist() == [0, 10, 0, 0] and written.is_contiguous()
