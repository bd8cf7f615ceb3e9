import gzip

import pytest
import torch

from core.errors import UserError
from evaluation.mnist import load_mnist, to_unit_range, train_holdout_split


def test_shipped_mnist_loads_with_labels():
    images, labels = load_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,)
    # every digit is present in the test split, roughly balanced (each 8.9-11.4 %)
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 850 and counts.max() < 1150 and counts.sum() == 10000


def test_split_is_disjoint_and_reproducible():
    train, held = train_holdout_split(10000)
    assert len(train) == 9000 and len(held) == 1000
    assert not set(train.tolist()) & set(held.tolist())
    assert torch.equal(held, train_holdout_split(10000)[1])


def test_unit_range_pads_with_background():
    x = to_unit_range(torch.full((1, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (1, 1, 32, 32)
    assert x[0, 0, 2:30, 2:30].eq(1).all() and x[0, 0, 0].eq(-1).all()


def test_truncated_file_is_a_user_error(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]) + bytes(100))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]))
    with pytest.raises(UserError, match="truncated"):
        load_mnist(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_mnist(tmp_path / "missing")
