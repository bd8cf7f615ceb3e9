"""Generation jobs: images decoded one by one, batches saved as they finish (resumable, shardable), the outputs.

``BatchStore`` keeps ``OUT.partial/``: ``run.json`` (what determines the images) and one file per
batch, each written atomically, so a killed run leaves whole batches only and resumes there;
``torchrun`` ranks each take every K-th batch (``frontends.sampling.shard``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.io import atomic_torch_save, atomic_write_text
from evaluation.images import grid, to_uint8


def decode_each(tokenizer, tokens) -> np.ndarray:
    """Decode image by image: a convolution's rounding depends on the batch size (±1 in 0.03 % of
    LlamaGen's uint8 pixels between batches of 4 and 1), and an image must not depend on its batch."""
    n = len(tokens[0]) if isinstance(tokens, (list, tuple)) else len(tokens)
    one = (lambda i: [t[i: i + 1] for t in tokens]) if isinstance(tokens, (list, tuple)) else (lambda i: tokens[i: i + 1])
    return np.concatenate([to_uint8(tokenizer.decode(one(i))) for i in range(n)])


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world, local


def fingerprint(path: str | None) -> list | None:
    """Path, size and modification time: a changed file invalidates saved batches."""
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class BatchStore:
    """``OUT.partial/``: ``run.json`` (what determines the images) and ``batch_<k>.pt``, each
    written under a temporary name and renamed, so a killed run leaves whole batches only."""

    def __init__(self, directory: Path, settings: dict, n_batches: int):
        self.dir, self.n, self.settings = directory, n_batches, settings
        run = self.dir / "run.json"
        if run.is_file():
            saved = json.loads(run.read_text())
            if saved != settings:
                changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
                raise UserError(f"{self.dir} holds batches of another run (different {', '.join(changed)}); "
                                f"delete it or use another --out")

    def path(self, k: int) -> Path:
        return self.dir / f"batch_{k:06d}.pt"

    def missing(self) -> list[int]:
        return [k for k in range(self.n) if not self.path(k).is_file()]

    def save(self, k: int, tokens, images: np.ndarray) -> None:
        if not (self.dir / "run.json").is_file():  # created with the first batch: a failed start leaves nothing
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "run.json", json.dumps(self.settings, indent=1))
        atomic_torch_save({"tokens": tokens, "images": torch.from_numpy(images)}, self.path(k))

    def load_all(self) -> tuple:
        """(tokens, images) of every batch in order; tokens concatenated per scale for VAR's lists."""
        parts = [torch.load(self.path(k), weights_only=True) for k in range(self.n)]
        images = torch.cat([p["images"] for p in parts]).numpy()
        first = parts[0]["tokens"]
        if isinstance(first, (list, tuple)):
            tokens = [torch.cat([p["tokens"][i] for p in parts]) for i in range(len(first))]
        else:
            tokens = torch.cat([p["tokens"] for p in parts])
        return tokens, images


def pick_device(choice: str, local_rank: int, uses_torch: bool) -> torch.device:
    if choice == "cuda" or (choice == "auto" and uses_torch and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return torch.device("cpu")


def write_outputs(out: Path, tokens, images: np.ndarray, labels: list[int]) -> None:
    from PIL import Image

    Image.fromarray(grid(images)).save(out / "grid.png")
    for i, (img, c) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(out / f"{i}_class{c}.png")
    np.savez(out / "samples.npz", images, np.asarray(labels, dtype=np.int64))
    torch.save(tokens, out / "tokens.pt")


def wait_for(store: BatchStore, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while store.missing() and time.monotonic() < deadline:
        time.sleep(1.0)
    missing = store.missing()
    if missing:
        raise UserError(f"{store.dir} lacks batches {missing[:8]}{' ...' if len(missing) > 8 else ''}: another rank "
                        f"is still running or stopped; run the command again (it resumes) or --merge once they finish")
