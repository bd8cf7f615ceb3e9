"""MNIST, the data set behind the shipped tiny models.

The repository carries the MNIST test split (10,000 digits, the standard idx ``.gz`` files;
CC BY-SA 3.0, Y. LeCun, C. Cortes, C. Burges) in ``data/mnist/``. Training uses the first
9,000 images of a seeded permutation; the last 1,000 are held out for the MNIST-FID
reference statistics and the classifier's test accuracy.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

from core.errors import UserError

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "data" / "mnist"
FILES = {"test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
HOLDOUT = 1000
SPLIT_SEED = 0


def _read_idx(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise UserError(f"MNIST file not found: {path} (pass --data DIR holding the idx .gz files)")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):  # 0x08: unsigned byte payload
        raise UserError(f"{path} is not an idx file of unsigned bytes (magic {magic:#x})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    if data.numel() != int(torch.tensor(dims).prod()):
        raise UserError(f"{path} is truncated: header says {dims}, payload has {data.numel()} bytes")
    return data.reshape(dims)


def load_mnist(root: str | Path | None = None, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 ``[N, 28, 28]`` and labels as int64 ``[N]``."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    images_name, labels_name = FILES[split]
    images = _read_idx(root / images_name)
    labels = _read_idx(root / labels_name).long()
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"MNIST in {root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def train_holdout_split(n: int, holdout: int = HOLDOUT, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, held_out)`` of a seeded permutation: the same split everywhere."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:-holdout], perm[-holdout:]


def to_unit_range(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, size, size]`` in [-1, 1], zero-padded to ``size``."""
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)
    pad = size - x.shape[-1]
    if pad < 0 or pad % 2:
        raise ValueError(f"cannot pad 28x28 digits to {size}x{size}")
    return torch.nn.functional.pad(x, (pad // 2,) * 4, value=-1.0)


def heldout_rgb(limit: int | None = None, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out digits (in split order, the first ``limit``) as uint8 ``[N, 32, 32, 3]`` (padded,
    grey repeated over RGB: the shipped tokenizers' input) and their labels."""
    images, labels = load_mnist(root)
    held = train_holdout_split(len(images))[1][:limit]
    x = ((to_unit_range(images[held]) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous(), labels[held]
