"""frontends.sampling.multinomial_rows: torch.multinomial's draws, image by image, without its host syncs."""
import pytest
import torch

from frontends.sampling import image_generators, multinomial_rows

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
    with pytest.raises(ValueError):  # one generator per image
        multinomial_rows(_probs((2, 3, 10), 3, "cpu"), image_generators(0, 3))
