"""The shipped MNIST classifier and its held-out FID reference."""
import numpy as np
import pytest
import torch

from core.errors import UserError
from evaluation.metrics import frechet_distance, gaussian_stats
from evaluation.mnist import load_mnist, to_unit_range, train_holdout_split
from evaluation.mnist_classifier import (
    CHECKPOINT,
    MnistClassifier,
    accuracy,
    images_to_input,
    load_classifier,
    load_fid_ref,
    predict,
    train_classifier,
)


@pytest.fixture(scope="module")
def mnist():
    images, labels = load_mnist()
    train, held = train_holdout_split(len(images))
    return images, labels, train, held


def test_shipped_checkpoint_is_a_small_fp16_state_dict():
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in MnistClassifier().parameters())


def test_heldout_accuracy_of_shipped_classifier(mnist):
    images, labels, _, held = mnist
    acc = accuracy(load_classifier(), to_unit_range(images[held]), labels[held])
    assert acc > 0.97, acc


def test_mnist_fid_of_heldout_digits_is_zero_and_noise_is_far(mnist):
    images, _, train, held = mnist
    model = load_classifier()
    mu, sigma, count = load_fid_ref()
    assert count == 1000 and mu.shape == (128,) and sigma.shape == (128, 128)
    feats, _ = predict(model, to_unit_range(images[held]))
    assert frechet_distance(*gaussian_stats(feats.double().numpy()), mu, sigma) < 1e-6
    # other real digits (training split) are close; noise is far
    real, _ = predict(model, to_unit_range(images[train[:500]]))
    fid_real = frechet_distance(*gaussian_stats(real.double().numpy()), mu, sigma)
    noise = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid_noise = frechet_distance(*gaussian_stats(predict(model, noise)[0].double().numpy()), mu, sigma)
    assert fid_noise > 50 * fid_real, (fid_real, fid_noise)


def test_images_to_input_layouts(mnist):
    images = mnist[0][:4]
    rgb = images[..., None].expand(-1, -1, -1, 3).numpy()
    assert torch.equal(images_to_input(rgb), to_unit_range(images))              # 28 px: padded like training
    assert torch.equal(images_to_input(images.numpy()), to_unit_range(images))   # [N, H, W]
    padded = to_unit_range(images)
    u8 = ((padded + 1) * 127.5).round().to(torch.uint8)[:, 0]
    assert torch.allclose(images_to_input(u8.numpy()), padded, atol=1e-6)     # 32 px: as is
    big = images_to_input(np.repeat(np.repeat(u8.numpy(), 2, 1), 2, 2))          # 64 px: resized back
    assert big.shape == (4, 1, 32, 32) and (big - padded).abs().mean() < 0.05  # antialiasing blurs a little
    with pytest.raises(UserError, match="uint8"):
        images_to_input(rgb.astype(np.float32))
    with pytest.raises(UserError, match="NHWC"):
        images_to_input(np.zeros((2, 3, 32, 32), np.uint8))


def test_train_classifier_is_seeded_and_learns(mnist):
    images, labels, train, held = mnist
    x, y = to_unit_range(images[train[:96]]), labels[train[:96]]
    a, b = (train_classifier(x, y, seed=3, epochs=1, batch=16) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = train_classifier(x, y, seed=4, epochs=1, batch=16)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    model = train_classifier(x, y, seed=3, epochs=8, batch=16)  # 48 steps on 96 digits
    assert accuracy(model, to_unit_range(images[held[:300]]), labels[held[:300]]) > 0.3  # chance is 0.1
