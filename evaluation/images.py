"""Evaluate generated images against a reference set, and against the FP generation they came from.

``load_samples`` reads the evaluator layout that ``tools.generate`` writes (``arr_0``: uint8
``[N, H, W, 3]``, ``arr_1``: labels, ``tokens.pt`` beside it) and checks it. ``evaluate`` computes
the metrics of ``evaluation.metrics`` with a chosen feature network and returns a flat dict.
"""
from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from evaluation import metrics

MNIST_SIZES = {(28, 28), (32, 32)}
MNIST_CLASSES = 10
PR_K = 3


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, H, W, 3]`` uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return out


def nhwc_uint8(images) -> torch.Tensor:
    """Checked uint8 images ``[N, H, W, 1|3]`` (``[N, H, W]`` gains the channel axis): the layout
    ``tools.generate`` writes and the feature networks read."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise UserError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"images must be [N, H, W] or [N, H, W, 1|3] (NHWC), got shape {tuple(x.shape)}")
    return x


@dataclass
class Samples:
    path: Path
    images: np.ndarray                 # uint8 [N, H, W, C]
    labels: np.ndarray | None = None   # int [N]
    tokens: object = None              # tensor or list of tensors (VAR's scales)
    logits: np.ndarray | None = None   # [N, ..., V]

    @property
    def is_mnist_size(self) -> bool:
        return tuple(self.images.shape[1:3]) in MNIST_SIZES


def load_samples(path: str | Path) -> Samples:
    """Images (``arr_0`` or ``images``), labels (``arr_1`` or ``labels``), ``tokens`` and ``logits``
    when stored; tokens also from a ``tokens.pt`` beside the file (what ``tools.generate`` writes)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sample file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if magic == b"\x93NUMPY":
        raise UserError(f"{path} is a single .npy array, expected an .npz with arr_0 (images) and arr_1 (labels)")
    if not magic.startswith(b"PK"):  # np.load would take any other bytes for a pickle
        raise UserError(f"{path} is not an .npz file (not a zip archive of arrays); expected what tools.generate "
                        f"writes: arr_0 (uint8 images), arr_1 (labels)")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path} is not a readable .npz file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def array(k: str) -> np.ndarray:
        try:
            return data[k]
        except ValueError:  # allow_pickle=False refuses object arrays
            raise UserError(f"{path}: array {k!r} holds Python objects (dtype object), which are not read; "
                            f"store numeric arrays (uint8 images, integer labels)") from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"{path}: array {k!r} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    with data:
        keys = set(data.files)
        key = next((k for k in ("arr_0", "images") if k in keys), None)
        if key is None:
            raise UserError(f"{path} has no image array 'arr_0' (keys: {', '.join(sorted(keys)) or 'none'})")
        images = array(key)
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            hint = " (looks like NCHW: transpose to NHWC)" if images.ndim == 4 and images.shape[1] in (1, 3) else ""
            raise UserError(f"{path}: {key} must be uint8 [N, H, W, 3] (NHWC), got {images.dtype} "
                            f"{list(images.shape)}{hint}")
        labels = next((array(k) for k in ("arr_1", "labels") if k in keys), None)
        if labels is not None and (labels.ndim != 1 or len(labels) != len(images)
                                   or not np.issubdtype(labels.dtype, np.integer)):
            raise UserError(f"{path}: labels must be integers [N={len(images)}], got {labels.dtype} {list(labels.shape)}")
        tokens = array("tokens") if "tokens" in keys else None
        logits = array("logits") if "logits" in keys else None
    if tokens is None and (path.parent / "tokens.pt").is_file():
        tokens = torch.load(path.parent / "tokens.pt", map_location="cpu", weights_only=True)
    return Samples(path, images, labels, tokens, logits)


def _batched(fn: Callable, images: np.ndarray, batch: int, progress, desc: str):
    feats, probs = [], []
    starts = range(0, len(images), batch)
    for i in (progress(starts, desc=desc, unit="batch") if progress else starts):
        f, p = fn(images[i:i + batch])
        feats.append(f)
        probs.append(p)
    return np.concatenate(feats), (np.concatenate(probs) if probs[0] is not None else None)


def mnist_extractor(model=None) -> Callable:
    """``images -> (128-d features, class probabilities)`` with the shipped MNIST classifier."""
    from evaluation.mnist_classifier import images_to_input, load_classifier, predict

    model = model if model is not None else load_classifier()

    def fn(images):
        f, p = predict(model, images_to_input(images))
        return f.double().numpy(), p.double().numpy()

    return fn


def inception_extractor(path=None) -> Callable:
    from evaluation.inception import InceptionFeatures

    net = InceptionFeatures(path)
    return lambda images: net(images, want_probs=True)


def check_paired(ref: Samples, sample: Samples) -> None:
    """Fidelity compares image i with image i: same count, size and requested classes."""
    if len(ref.images) != len(sample.images):
        raise UserError(f"fidelity needs the same images: {ref.path} has {len(ref.images)}, "
                        f"{sample.path} has {len(sample.images)}")
    if ref.images.shape != sample.images.shape:
        raise UserError(f"fidelity needs the same image size: {list(ref.images.shape)} vs {list(sample.images.shape)}")
    if ref.labels is not None and sample.labels is not None and not np.array_equal(ref.labels, sample.labels):
        n = int((ref.labels != sample.labels).sum())
        raise UserError(f"fidelity needs the same classes in the same order: labels differ at {n} of "
                        f"{len(ref.labels)} positions")


def fidelity(ref: Samples, sample: Samples) -> dict:
    check_paired(ref, sample)
    per_image = metrics.psnr(ref.images, sample.images)
    # PSNR of the mean squared error over all images: the mean of per-image PSNRs is infinite as
    # soon as one quantized image equals its FP twin, which is common at 8 bits
    mse = float(np.mean((ref.images.astype(np.float64) - sample.images.astype(np.float64)) ** 2))
    out = {"psnr_db": float(10 * np.log10(255.0 ** 2 / mse)) if mse > 0 else float("inf"),
           "identical_images": float(np.isinf(per_image).mean()),
           "ssim": float(np.mean(metrics.ssim(ref.images, sample.images)))}
    if ref.tokens is not None and sample.tokens is not None:
        try:
            if isinstance(ref.tokens, torch.Tensor) and ref.tokens.is_floating_point():  # continuous (MAR)
                out.update(metrics.continuous_token_fidelity(ref.tokens, sample.tokens))
            else:
                out["token_agreement"] = metrics.token_agreement(ref.tokens, sample.tokens)
        except ValueError as e:
            raise UserError(f"tokens of {ref.path} and {sample.path} do not pair up: {e}") from None
    if ref.logits is not None and sample.logits is not None:
        try:
            out["logit_kl"] = metrics.logit_kl(ref.logits, sample.logits)
        except ValueError as e:
            raise UserError(f"logits of {ref.path} and {sample.path} do not pair up: {e}") from None
    return out


def edit_scores(edited: np.ndarray, recon: np.ndarray, keep: np.ndarray, labels: np.ndarray | None = None,
                fp: np.ndarray | None = None) -> dict:
    """How a zero-shot edit treated its input: PSNR of the kept pixels and of the regenerated ones
    against the input's reconstruction (the kept tokens are the input's, so the first is high but
    not infinite: the decoder and the coarse scales mix across the box's edge); for MNIST-size
    images, MNIST-FID against the held-out digits and, with labels 0-9, the share the classifier
    puts in ``labels`` (the target class of a class-conditional edit; the input's own class for
    in/outpainting). With ``fp`` (the FP model's edits of the same inputs and seeds): PSNR and SSIM
    to them in the regenerated region, the quantized model's fidelity on the task."""
    keep = np.asarray(keep, bool)
    out = {"psnr_kept_db": metrics.masked_psnr(edited, recon, keep),
           "psnr_generated_db": metrics.masked_psnr(edited, recon, ~keep), "mnist_fid": None, "class_accuracy": None}
    if fp is not None:
        out["psnr_generated_vs_fp_db"] = metrics.masked_psnr(edited, fp, ~keep)
        out["ssim_generated_vs_fp"] = metrics.masked_ssim(edited, fp, ~keep)
    if tuple(edited.shape[1:3]) in MNIST_SIZES:
        from evaluation.mnist_classifier import load_fid_ref

        feats, probs = mnist_extractor()(edited)
        mu, sigma, _ = load_fid_ref()
        out["mnist_fid"] = metrics.frechet_distance(*metrics.gaussian_stats(feats), mu, sigma)
        if labels is not None and all(0 <= int(c) < MNIST_CLASSES for c in labels):
            out["class_accuracy"] = metrics.class_accuracy(probs, labels)
    return out


def evaluate(ref: Samples, sample: Samples, *, features: str = "auto", inception: str | Path | None = None,
             mnist: bool | None = None, paired: bool | None = None, batch: int = 250, progress=None) -> dict:
    """FID, IS, precision/recall of ``sample`` against ``ref`` in the chosen feature space; MNIST-FID
    and class accuracy (``mnist``: default when the images are 28 or 32 px square); fidelity of
    ``sample`` to ``ref`` (``paired``: default when both carry the same labels and image shape).

    IS needs class probabilities: the MNIST classifier has them, Inception only in scripts with a
    logits head (NVIDIA's); otherwise ``is`` is None.
    """
    for s in (ref, sample):
        if len(s.images) < 2:
            raise UserError(f"{s.path} holds {len(s.images)} image(s); FID needs at least 2")
    if features == "auto":
        features = "mnist" if ref.is_mnist_size and sample.is_mnist_size else "inception"
    if features not in ("mnist", "inception"):
        raise UserError(f"unknown feature network {features!r} (mnist or inception)")
    mnist = sample.is_mnist_size if mnist is None else mnist
    if mnist and sample.labels is not None:
        bad = sorted({int(c) for c in sample.labels if not 0 <= c < MNIST_CLASSES})
        if bad:
            raise UserError(f"{sample.path}: labels {bad[:5]} are not MNIST classes (0..{MNIST_CLASSES - 1}), so class "
                            f"accuracy cannot be scored; pass --no-mnist to skip the MNIST metrics")
    if paired is None:
        paired = (ref.labels is not None and sample.labels is not None and ref.images.shape == sample.images.shape
                  and np.array_equal(ref.labels, sample.labels))

    classifier = mnist_extractor() if (features == "mnist" or mnist) else None
    extract = classifier if features == "mnist" else inception_extractor(inception)
    f_ref, p_ref = _batched(extract, ref.images, batch, progress, f"{features} features (ref)")
    f_smp, p_smp = _batched(extract, sample.images, batch, progress, f"{features} features (sample)")

    out: dict = {"features": features, "count_ref": len(ref.images), "count_sample": len(sample.images),
                 "fid": metrics.fid_from_features(f_ref, f_smp),
                 "is": metrics.inception_score(p_smp) if p_smp is not None else None,
                 "is_ref": metrics.inception_score(p_ref) if p_ref is not None else None,
                 "precision": None, "recall": None}
    if min(len(f_ref), len(f_smp)) > PR_K:
        out["precision"], out["recall"] = metrics.precision_recall(f_ref, f_smp, k=PR_K)

    if mnist:
        from evaluation.mnist_classifier import load_fid_ref

        mu, sigma, _ = load_fid_ref()
        if features == "mnist":
            mf_smp, mp_smp, mf_ref = f_smp, p_smp, f_ref
        else:
            mf_smp, mp_smp = _batched(classifier, sample.images, batch, progress, "mnist features (sample)")
            mf_ref, _ = _batched(classifier, ref.images, batch, progress, "mnist features (ref)")
        out["mnist_fid"] = metrics.frechet_distance(*metrics.gaussian_stats(mf_smp), mu, sigma)
        out["mnist_fid_ref"] = metrics.frechet_distance(*metrics.gaussian_stats(mf_ref), mu, sigma)
        out["mnist_is"] = metrics.inception_score(mp_smp)
        out["class_accuracy"] = (metrics.class_accuracy(mp_smp, sample.labels)
                                 if sample.labels is not None else None)
    if paired:
        out.update(fidelity(ref, sample))
    return out
