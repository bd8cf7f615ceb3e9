"""Calibration data from the model's own generations (PTQ4ARVG §5.1, reference/method.md).

The FP driver samples images with the family's official settings (CFG included, so every
step runs on the conditional and the unconditional half); every step's inputs are recorded
so the traced step graph can be replayed on them. Steps are written to a ``CalibCache`` one
generation batch at a time, so an interrupted capture resumes where it stopped, and they
are read back lazily (``CachedSteps``), so the observers never hold more than one batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from calib.cache import CalibCache, calib_key
from passes.diagnostics import UserError


class CachedSteps(Sequence):
    """The recorded step-input tuples of every chunk of a cache, loaded one chunk at a time."""

    def __init__(self, cache: CalibCache, counts: list[int]):
        self.cache, self.counts = cache, counts
        self._loaded: tuple[int, list] | None = None

    def __len__(self) -> int:
        return sum(self.counts)

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = 0
        while i >= self.counts[chunk]:
            i -= self.counts[chunk]
            chunk += 1
        if self._loaded is None or self._loaded[0] != chunk:
            self._loaded = (chunk, self.cache.load(chunk)["steps"])
        return tuple(self._loaded[1][i])


def capture(bundle, *, classes: list[int], seed: int, cache_dir: str | Path, batch: int = 4,
            progress: Callable = lambda it, **kw: it) -> CachedSteps:
    """Generate one image per class in ``classes`` (batches of ``batch``) and record every step's inputs."""
    generate = bundle.extra.get("generate")
    if generate is None:
        raise UserError(f"{bundle.name}: this model has no generation driver; pass --calib-data FILE")
    step = bundle.module.eval()
    batches = [classes[i:i + batch] for i in range(0, len(classes), batch)]
    sampler = {k: v for k, v in (bundle.extra.get("sampling") or {}).items()}
    key = calib_key(bundle.module.state_dict(), {"family": bundle.family, "classes": classes, "batch": batch, **sampler},
                    seed, len(classes))
    cache = CalibCache(cache_dir, key, len(batches))
    counts = []
    for i, labels in enumerate(progress(batches, desc="capturing calibration steps", unit="batch")):
        if not cache.has(i):
            recorded: list[tuple] = []

            def recording_step(*inputs):
                recorded.append(tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in inputs))
                return step(*inputs)

            with torch.no_grad():
                generate(torch.tensor(labels), seed + i, step=recording_step)
            cache.save(i, {"steps": recorded})
        counts.append(len(cache.load(i)["steps"]))
    return CachedSteps(cache, counts)
