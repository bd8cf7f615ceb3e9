"""Sampling helpers shared by the family drivers and tools.generate: per-image seeds, batches, shards."""
from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B1  # 2**32 / golden ratio: spreads image indices over the 32-bit seed space


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a run with ``seed``.

    torch's generators keep only the low 32 bits of a seed (``seed + i * 2**32`` would give every
    image the same stream), so the index is spread by the golden-ratio constant: image 0 gets
    ``seed`` itself (the official scripts' ``torch.manual_seed(seed)``), a seed's images never
    collide, and seeds less than 1000 apart collide only beyond 2.6 million images. The map is
    additive, ``image_seed(image_seed(seed, a), b) == image_seed(seed, a + b)``, so a batch that
    starts at image ``a`` is a run with seed ``image_seed(seed, a)`` (``batch_seed``).
    """
    return (seed + index * _GOLDEN) % 2**32


def image_generators(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded by ``image_seed(seed, i)``, so an image does not depend on
    the batch it was generated in. A CUDA generator draws a different stream than a CPU one with
    the same seed."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in range(n)]


def bad_probs(probs: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on ``probs``' device: some distribution holds inf, nan, a negative value or no mass."""
    return ~(((probs >= 0) & (probs < torch.inf)).all() & (probs.sum(-1) > 0).all())


def check_probs(flags: list[torch.Tensor]) -> None:
    """Raise if any ``bad_probs`` flag is set: one host sync for all of them."""
    if flags and bool(torch.stack(flags).any()):
        raise RuntimeError("sampling: probabilities contain inf, nan, a negative value or a row summing to 0")


def multinomial_rows(probs: torch.Tensor, generators: list[torch.Generator], *,
                     bad: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One draw per distribution of ``probs [B, ..., V]``, image b's from ``generators[b]``: the tokens of
    ``torch.multinomial(probs[b], 1, generator=generators[b])`` for every b, shaped ``[B, ...]``.

    torch draws one sample as ``argmax(p / q)`` with ``q ~ Exp(1)`` from the generator, after two host syncs
    that check the input: 2·B syncs a scale stall the GPU between kernels. Here each image draws its own
    ``q`` (its stream unchanged), the division and argmax run once for the batch, and the input is checked
    with one sync, or none with ``bad``: a list the check's flag is appended to, for the sampler to check every
    draw's at the end (``check_probs``), so the GPU never waits for the host between steps. A bad distribution
    still draws some token in range."""
    flag = bad_probs(probs)
    if bad is None:
        check_probs([flag])
    else:
        bad.append(flag)
    q = torch.empty_like(probs)
    for q_b, g in zip(q, generators, strict=True):
        q_b.exponential_(generator=g)
    return (probs / q).argmax(-1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float, *, rule: str = "var") -> torch.Tensor:
    """``logits`` with -inf where top-k, then nucleus (top-p) filtering drops a token, over the last dim.

    Top-k keeps the logits >= the k-th largest (ties with it included); ``top_k <= 0`` keeps all. The nucleus
    follows the family's official code: ``rule="var"`` (VAR, Infinity: ``top_p > 0`` drops the least likely
    tokens while their cumulative mass, summed from the least likely, is <= 1 - top_p) or ``"hf"`` (LlamaGen:
    ``top_p < 1`` drops the tokens after the cumulative mass, from the most likely, exceeds top_p; the token
    that crosses it stays). The most likely token always stays.

    One descending sort serves both filters: the k-th largest is its k-th entry, and the nucleus sums the
    same sorted values as the official code's sort of the top-k-filtered logits, so the probabilities and their
    sums are the same numbers (only equal logits at the nucleus' edge may be ordered otherwise). The official
    order (``topk``, then a sort of the filtered logits) sorts twice."""
    if rule not in ("var", "hf"):
        raise ValueError(f"unknown nucleus rule {rule!r}: 'var' or 'hf'")
    k = min(top_k, logits.shape[-1])
    if not (top_p > 0 if rule == "var" else top_p < 1):
        if k <= 0:
            return logits
        return logits.masked_fill(logits < logits.topk(k, dim=-1).values[..., -1:], -torch.inf)
    desc, order = logits.sort(dim=-1, descending=True)
    if k > 0:
        desc = desc.masked_fill(desc < desc[..., k - 1 : k], -torch.inf)
    if rule == "var":  # mass summed from the least likely, as the official ascending sort sums it
        drop = (desc.flip(-1).softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p).flip(-1)
    else:  # a token goes when the tokens before it already hold more than top_p
        crossed = desc.softmax(dim=-1).cumsum(dim=-1) > top_p
        drop = torch.cat((torch.zeros_like(crossed[..., :1]), crossed[..., :-1]), dim=-1)
    drop[..., 0] = False  # the most likely token
    drop |= desc == -torch.inf  # top-k's
    return logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)


def zero_cache(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A fresh KV cache of zeros in ``like``'s dtype and device, as one zero broadcast to ``shape``: no memory and
    no fill. A functional step reads it as zeros and returns a new cache; ``CudaStep`` fills its own cache buffer
    from it in one pass, where a materialized cache cost a fill and a copy (5.3 ms of a VAR-d16 generation at
    batch 64 on an H100). Write into it only out of place."""
    return like.new_zeros(()).expand(shape)


def on_device(device: torch.device, *tensors: torch.Tensor) -> tuple:
    """Step inputs moved to the model's device: the drivers build them on the CPU, a GPU step needs them there."""
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)


def batch_seed(seed: int, first_image: int) -> int:
    """The seed to pass a driver for a batch starting at image ``first_image``: its images then
    draw exactly the streams they draw in one big batch (``image_seed`` is additive)."""
    return image_seed(seed, first_image)


def batches(n: int, batch_size: int) -> list[range]:
    """Image indices ``0..n-1`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def shard(items: list, rank: int, world_size: int) -> list:
    """The items of ``rank`` among ``world_size`` processes: every ``world_size``-th from ``rank``
    (round robin, so ranks get equal work when the last batch is short)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return items[rank::world_size]
