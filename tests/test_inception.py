"""Loading, resizing and feature code of the Inception FID network, on scripted stand-ins
(the real network is an optional 81 MB wheel; benchmarks/verify_fid_inception.py checks it)."""
import importlib

import numpy as np
import pytest
import torch

from core.errors import UserError
from evaluation import inception as I


class PoolStandIn(torch.nn.Module):
    """``forward(img)`` like default_1.pt; features 0-4 report what it was fed."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 4, dim)

    def forward(self, img):
        return self.feats(img)

    def feats(self, img):
        f = torch.relu(self.proj(torch.nn.functional.adaptive_avg_pool2d(img, 4).flatten(1)))
        f[:, 0] = img.amin((1, 2, 3))
        f[:, 1] = img.amax((1, 2, 3))
        f[:, 2] = img.shape[2]
        f[:, 3] = img.shape[3]
        f[:, 4] = img.shape[1]
        return f


class NvidiaStandIn(PoolStandIn):
    """``forward(img, return_features=False)`` like NVIDIA's inception-2015-12-05.pt (probabilities by default)."""

    def forward(self, img, return_features: bool = False):
        f = self.feats(img)
        if return_features:
            return f
        return torch.softmax(f[:, :1008] * 0 + torch.arange(1008.0) / 100, 1)


def _script(tmp_path, module, name="net.pt"):
    path = tmp_path / name
    torch.jit.script(module).save(str(path))
    return path


def test_pool_convention_resizes_to_299_and_scales_like_tf(tmp_path):
    net = I.InceptionFeatures(_script(tmp_path, PoolStandIn()))
    assert not net.nvidia and not net.has_probs
    images = np.zeros((3, 40, 24), np.uint8)   # grey NHW, not square
    images[:, 10:30, 5:15] = 255
    feats, probs = net(images)
    assert feats.shape == (3, 2048) and probs is None
    assert feats[:, 0] == pytest.approx(-1.0) and feats[:, 1] == pytest.approx(255 / 128 - 1)
    assert (feats[:, 2:5] == [299, 299, 3]).all()
    with pytest.raises(UserError, match="uint8"):
        net(images.astype(np.float32))


def test_nvidia_convention_gets_raw_pixels_and_probabilities(tmp_path):
    net = I.InceptionFeatures(_script(tmp_path, NvidiaStandIn()))
    assert net.nvidia and net.has_probs
    images = np.full((2, 32, 32, 3), 200, np.uint8)
    feats, probs = net(images, want_probs=True)
    assert (feats[:, :5] == [200, 200, 32, 32, 3]).all()   # [0, 255], its own size: it resizes inside
    assert probs.shape == (2, 1008) and np.allclose(probs.sum(1), 1)


def test_wrong_feature_width_and_bad_files(tmp_path):
    net = I.InceptionFeatures(_script(tmp_path, PoolStandIn(dim=100)))
    with pytest.raises(UserError, match="100-d"):
        net(np.zeros((1, 8, 8, 3), np.uint8))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a TorchScript"):
        I.InceptionFeatures(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        I.find_inception(tmp_path / "missing.pt")


def test_finds_the_wheel_file_or_says_how_to_install(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / I.WHEEL_PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    _script(pkg, PoolStandIn(), I.WHEEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert I.find_inception() == pkg / I.WHEEL_FILE
    monkeypatch.setattr(I.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"arvg-quant\[fid\].*--inception"):
        I.find_inception()


def test_tf_bilinear_resize_matches_direct_formula():
    x = torch.arange(4 * 6, dtype=torch.float64).reshape(1, 1, 4, 6) ** 1.5
    out = I.tf_bilinear_resize(x, size=7)

    def sample(img, sy, sx):  # TF1 legacy: src = dst * in / out, clamped at the border
        y0, x0 = int(np.floor(sy)), int(np.floor(sx))
        y1, x1 = min(y0 + 1, img.shape[0] - 1), min(x0 + 1, img.shape[1] - 1)
        fy, fx = sy - y0, sx - x0
        return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))

    img = x[0, 0].numpy()
    direct = np.array([[sample(img, j * 4 / 7, i * 6 / 7) for i in range(7)] for j in range(7)])
    assert np.allclose(out[0, 0].numpy(), direct, atol=1e-9)
    assert I.tf_bilinear_resize(x, size=4).shape == (1, 1, 4, 4)
