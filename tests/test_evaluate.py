"""tools.evaluate end to end on small npz files, and its one-line errors."""
import json

import numpy as np
import pytest
import torch

from core.errors import UserError
from evaluation.images import load_samples
from evaluation.mnist import load_mnist, train_holdout_split
from tests.test_inception import PoolStandIn, _script
from tools.evaluate import main


@pytest.fixture(scope="module")
def digits():
    images, labels = load_mnist()
    held = train_holdout_split(len(images))[1]
    return np.repeat(images[held].numpy()[..., None], 3, -1), labels[held].numpy()


def _save(path, images, labels=None, **extra):
    arrays = [images] + ([labels] if labels is not None else [])
    np.savez(path, *arrays, **extra)
    return str(path)


def test_mnist_evaluation_and_fidelity(tmp_path, digits, capsys):
    images, labels = digits
    ref = _save(tmp_path / "ref.npz", images[:64], labels[:64])
    other = _save(tmp_path / "other.npz", images[64:128], labels[64:128])
    assert main([ref, other, "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["features"] == "mnist" and r["count_ref"] == 64
    assert r["class_accuracy"] > 0.95 and 8 < r["mnist_is"] <= 10   # real digits, balanced classes
    assert 0 < r["fid"] < 100 and 0.5 < r["precision"] <= 1 and 0.5 < r["recall"] <= 1
    assert "psnr_db" not in r  # different classes: not a pair
    assert "| FID |" in capsys.readouterr().out

    # the same classes: a quantized copy with noise and a few changed tokens
    rng = np.random.default_rng(0)
    noisy = np.clip(images[:64] + rng.normal(0, 20, images[:64].shape), 0, 255).astype(np.uint8)
    tokens = rng.integers(0, 100, (64, 16))
    changed = tokens.copy()
    changed[:, :4] += 1
    logits = rng.standard_normal((64, 16, 10))
    ref2 = _save(tmp_path / "ref2.npz", images[:64], labels[:64], tokens=tokens, logits=logits)
    q = _save(tmp_path / "q.npz", noisy, labels[:64], tokens=changed, logits=logits + rng.normal(0, 0.1, logits.shape))
    assert main([ref2, q, "--json", str(tmp_path / "f.json"), "--batch", "20"]) == 0
    f = json.loads((tmp_path / "f.json").read_text())
    expected_psnr = 10 * np.log10(255 ** 2 / ((images[:64].astype(float) - noisy) ** 2).mean())
    assert f["psnr_db"] == pytest.approx(expected_psnr) and 10 < f["psnr_db"] < 30
    assert 0 < f["ssim"] < 0.9 and f["token_agreement"] == pytest.approx(0.75) and f["identical_images"] == 0
    assert 0 < f["logit_kl"] < 0.02
    assert f["mnist_fid"] > r["mnist_fid_ref"]  # noise moves the digits away from the held-out statistics

    # identical generations: infinite PSNR (strict JSON string), SSIM 1, FID 0
    assert main([ref2, ref2, "--json", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["psnr_db"] == "inf" and same["ssim"] == pytest.approx(1) and same["fid"] < 1e-6
    assert same["identical_images"] == 1
    assert same["token_agreement"] == 1.0 and same["logit_kl"] == pytest.approx(0, abs=1e-12)


def test_tokens_pt_beside_the_npz(tmp_path, digits):
    images, labels = digits
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save([torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5, 6]])], tmp_path / "a" / "tokens.pt")
    torch.save([torch.tensor([[1, 0]]), torch.tensor([[3, 4, 5, 6]])], tmp_path / "b" / "tokens.pt")
    a = load_samples(_save(tmp_path / "a" / "samples.npz", images[:8], labels[:8]))
    b = load_samples(_save(tmp_path / "b" / "samples.npz", images[:8], labels[:8]))
    from evaluation.images import fidelity

    assert fidelity(a, b)["token_agreement"] == pytest.approx(5 / 6)


def test_inception_features_with_a_stand_in(tmp_path, digits):
    images, labels = digits
    big = np.repeat(np.repeat(images[:12], 2, 1), 2, 2)  # 56 px: not MNIST size -> inception
    ref = _save(tmp_path / "ref.npz", big[:6], labels[:6])
    smp = _save(tmp_path / "smp.npz", big[6:], labels[6:12])
    net = _script(tmp_path, PoolStandIn())
    assert main([ref, smp, "--inception", str(net), "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["features"] == "inception" and r["is"] is None and r["fid"] > 0 and "mnist_fid" not in r
    assert main([ref, smp, "--inception", str(net), "--mnist", "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["fid"] == pytest.approx(r["fid"]) and m["class_accuracy"] > 0.8  # classifier on resized digits


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("nchw", "NCHW"),
    ("float", "uint8"),
    ("nokey", "no image array"),
    ("labels", "labels must be"),
    ("count", "same images"),
    ("classes", "labels differ at 2 of"),
    ("one", "at least 2"),
    ("npy", "expected an .npz"),
])
def test_bad_input_is_one_line_error(tmp_path, digits, capsys, case, message):
    images, labels = digits
    ref = _save(tmp_path / "ref.npz", images[:8], labels[:8])
    smp = tmp_path / "smp.npz"
    extra = []
    if case == "nchw":
        _save(smp, images[:8].transpose(0, 3, 1, 2).copy())
    elif case == "float":
        _save(smp, images[:8].astype(np.float32))
    elif case == "nokey":
        np.savez(smp, pictures=images[:8])
    elif case == "labels":
        _save(smp, images[:8], labels[:5])
    elif case == "count":
        _save(smp, images[:6], labels[:6])
        extra = ["--paired"]
    elif case == "classes":
        flipped = labels[:8].copy()
        flipped[:2] = (flipped[:2] + 1) % 10
        _save(smp, images[:8], flipped)
        extra = ["--paired"]
    elif case == "one":
        _save(smp, images[:1], labels[:1])
    elif case == "npy":
        smp = tmp_path / "smp.npy"
        np.save(smp, images[:8])
    capsys.readouterr()
    assert main([ref, str(smp), "--json", str(tmp_path / "out.json"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "out.json").exists()


def test_missing_inception_network_says_how_to_get_it(tmp_path, digits, monkeypatch):
    import evaluation.inception as I

    monkeypatch.setattr(I.importlib.util, "find_spec", lambda name: None)
    big = np.zeros((4, 40, 40, 3), np.uint8)
    with pytest.raises(UserError, match=r"arvg-quant\[fid\]"):
        from evaluation.images import evaluate

        evaluate(load_samples(_save(tmp_path / "a.npz", big)), load_samples(_save(tmp_path / "b.npz", big)))
