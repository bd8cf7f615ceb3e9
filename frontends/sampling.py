"""Sampling helpers shared by the family drivers."""
from __future__ import annotations

import torch


def image_generators(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, seeded from (seed, image index), so an image does not depend on
    the batch it was generated in.

    torch's generators keep only the low 32 bits of a seed (``seed + i * 2**32`` would give every
    image the same stream), so the index is spread by the golden-ratio constant: image 0 gets
    ``seed`` itself (the official scripts' ``torch.manual_seed(seed)``), a seed's images never
    collide, and seeds less than 1000 apart collide only beyond 2.6 million images. A CUDA
    generator draws a different stream than a CPU one with the same seed.
    """
    return [torch.Generator(device=device).manual_seed((seed + i * 0x9E3779B1) % 2**32) for i in range(n)]
