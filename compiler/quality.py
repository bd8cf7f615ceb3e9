"""Image quality of a compiled generator, measured in the compile run (``--evaluate N``).

Every generator draws the same N images: classes ``0, 1, ..., C-1`` in turn, one seed per image
(``frontends.sampling.image_generators``), so image i of a quantized model pairs with image i of
the FP model. Fidelity to FP (token agreement, PSNR and SSIM of the decoded images) compares the
pairs; for MNIST-size images the shipped classifier adds MNIST-FID against the held-out digits and
the class accuracy of the generated digits (``evaluation.images``).

Rows: the FP model, the compiled artefact on its target (the onnxruntime int8 model for
``--target ort``), and ``--compare RECIPE:BITS,...``: other recipes quantized from the same
calibration set and run as torch fake-quant steps, so one run ranks them. A ``--compare`` recipe that
cannot quantize the model (a pattern that matches nothing in this family, a bit width it refuses) is a
row holding its error line instead of scores, and the run goes on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from core.qmath import precision
from passes.recipes import load_recipe


@dataclass
class Row:
    name: str           # what the table calls it: "FP", "ptq4arvg W8A8 (onnxruntime int8)"
    recipe: str | None
    bits: str | None
    backend: str        # "torch fp32", "onnxruntime int8", "torch fake-quant"
    step: object        # the step callable the family driver runs (None: the eager FP model)
    head: object = None  # MAR: the diffusion head callable (None: the FP head)
    error: str | None = None  # a --compare recipe that could not quantize this model: the tool's error line


def parse_compare(text: str) -> list[tuple[str, str]]:
    """``"minmax:W8A8,ptq4arvg:W6A6"`` -> ``[("minmax", "W8A8"), ("ptq4arvg", "W6A6")]``, checked."""
    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        recipe, sep, bits = item.partition(":")
        if not sep:
            raise UserError(f"--compare wants RECIPE:BITS items, got {item!r}")
        precision(bits, f"--compare {item}: BITS")
        load_recipe(recipe)  # an unknown recipe fails now, before any work
        pairs.append((recipe, bits))
    return pairs


def fixed_labels(num_classes: int, n: int) -> torch.Tensor:
    """Classes in turn, so a grid of ``num_classes`` columns shows one class per column."""
    if n < 2:
        raise UserError(f"--evaluate needs at least 2 images, got {n}")
    return torch.arange(n) % num_classes


def draw(bundle, step, labels: torch.Tensor, seed: int, name: str, head=None):
    """Generate and decode ``labels`` with ``step``; returns ``evaluation.images.Samples``."""
    from evaluation.images import Samples, to_uint8

    with torch.no_grad():
        tokens = bundle.extra["generate"](labels, seed, step=step, **({"head": head} if head is not None else {}))
        # one batch for every row: the rows pair image by image and decode the same way
        images = to_uint8(bundle.extra["tokenizer"].decode(tokens))
    return Samples(Path(name), images, labels.numpy(), tokens)


def score(fp, sample) -> dict:
    """Fidelity of ``sample`` to ``fp``; MNIST-FID and class accuracy for MNIST-size images."""
    from evaluation.images import evaluate, fidelity

    if not fp.is_mnist_size:
        return fidelity(fp, sample)
    r = evaluate(fp, sample, features="mnist", mnist=True, paired=sample is not fp)
    keep = ("mnist_fid", "class_accuracy", "token_agreement", "token_cosine", "token_rel_mse", "psnr_db",
            "identical_images", "ssim")
    return {k: r[k] for k in keep if k in r}


def evaluate_rows(bundle, rows: list[Row], n: int, seed: int, progress) -> tuple[list[dict], dict]:
    """Score every row against the first (FP); returns the table rows and the samples by name."""
    labels = fixed_labels(bundle.extra["model"].config.num_classes, n)
    samples, table = {}, []
    for row in progress(rows, desc="generating and scoring", unit="model"):
        if row.error is not None:  # nothing to draw: the row keeps the reason
            table.append({"name": row.name, "recipe": row.recipe, "bits": row.bits, "backend": row.backend,
                          "error": row.error})
            continue
        t0 = time.perf_counter()
        samples[row.name] = draw(bundle, row.step, labels, seed, row.name, row.head)
        seconds = time.perf_counter() - t0
        fp = samples[rows[0].name]
        metrics = score(fp, samples[row.name])
        if row is rows[0]:  # fidelity of FP to itself is trivially perfect: leave it blank
            metrics = {k: v for k, v in metrics.items()
                       if k not in ("token_agreement", "token_cosine", "token_rel_mse", "psnr_db", "identical_images",
                                    "ssim")}
        table.append({"name": row.name, "recipe": row.recipe, "bits": row.bits, "backend": row.backend,
                      "generation_s": seconds, **metrics})
    return table, samples


def write_grids(out: Path, samples: dict, columns: int) -> dict[str, str]:
    """One PNG grid per row under ``out/images/``; returns {row name: relative path}."""
    from PIL import Image

    from evaluation.images import grid

    (out / "images").mkdir(exist_ok=True)
    paths = {}
    for i, (name, s) in enumerate(samples.items()):
        rel = f"images/{i:02d}_{''.join(c if c.isalnum() else '_' for c in name).strip('_').lower()}.png"
        img = grid(s.images, cols=columns)
        Image.fromarray(img if img.shape[-1] == 3 else np.repeat(img, 3, axis=-1)).save(out / rel)
        paths[name] = rel
    return paths


COLUMNS = (("model", "name", "{}"), ("runs on", "backend", "{}"), ("tokens = FP", "token_agreement", "{:.1%}"),
           ("token cos vs FP", "token_cosine", "{:.4f}"), ("token rel. MSE", "token_rel_mse", "{:.2e}"),
           ("images = FP", "identical_images", "{:.0%}"), ("PSNR vs FP", "psnr_db", "{:.1f} dB"),
           ("MNIST-FID", "mnist_fid", "{:.1f}"), ("class accuracy", "class_accuracy", "{:.1%}"),
           ("not compared", "error", "error: {}"))


def table_rows(section: dict) -> tuple[list[str], list[list[str]]]:
    """The quality table as text cells (report.md and the compile summary share it)."""
    cols = [c for c in COLUMNS if any(c[1] in r for r in section["rows"])]
    return [c[0] for c in cols], [[fmt.format(r[key]) if r.get(key) is not None else "—" for _, key, fmt in cols]
                                  for r in section["rows"]]
