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

With an edit task (``--task inpaint|outpaint|edit``, VAR) every row edits the same N inputs with
the same seeds instead (``compiler.generation``'s jobs, as ``tools.generate --task``): PSNR of the
kept region against the input's reconstruction, PSNR and SSIM to the FP edits in the regenerated
region, MNIST-FID and class accuracy of the edited digits (``evaluation.images.edit_scores``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


class EditRun(NamedTuple):
    job: object            # compiler.generation.EditJob: the task, box, input of every output, recorded labels
    labels: torch.Tensor   # the class each output is conditioned on (-1: unconditional)


def edit_run(bundle, task, n: int) -> EditRun:
    """The first ``n`` outputs of ``task`` (``config.EditTaskConfig``) on ``bundle``; bad inputs fail here."""
    from compiler.generation import EDIT_TASKS, EditJob, edit_jobs, load_edit_images, parse_box

    if "edit" not in bundle.extra:
        raise UserError(f"--task {task.task}: zero-shot edits are implemented for VAR, not {bundle.family}")
    per_input = len(task.classes) if task.task == "edit" and task.classes else 1
    images, own = load_edit_images(task.images, -(-n // per_input))
    box = parse_box(task.box, *images.shape[1:3])
    bundle.extra["edit_check"](images.shape[1:3], box, inpainting=EDIT_TASKS[task.task])
    sources, labels, recorded = edit_jobs(task.task, len(images), task.classes, own, 1)
    if len(sources) < 2:
        raise UserError(f"--evaluate --task {task.task} needs at least 2 edits; {task.images} gives {len(sources)}")
    sources, labels, recorded = sources[:n], labels[:n], recorded[:n]
    return EditRun(EditJob(task.task, box, images[sources], recorded), torch.tensor(labels))


def draw_edit(bundle, step, run: EditRun, seed: int, name: str):
    """Edit ``run``'s inputs with ``step``: (``Samples`` of the edits, the inputs' reconstructions, kept pixels)."""
    from compiler.generation import EDIT_TASKS, decode_each, to_unit_images
    from evaluation.images import Samples

    job, tok = run.job, bundle.extra["tokenizer"]
    with torch.no_grad():
        edit = bundle.extra["edit"](run.labels, to_unit_images(job.inputs), job.box, inpainting=EDIT_TASKS[job.task],
                                    seed=seed, step=step)
        images, recon = decode_each(tok, edit.tokens), decode_each(tok, edit.input_tokens)
    return Samples(Path(name), images, np.asarray(job.recorded), edit.tokens), recon, edit.keep_pixels.cpu().numpy()


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


VS_FP = ("token_agreement", "token_cosine", "token_rel_mse", "psnr_db", "identical_images", "ssim",
         "psnr_generated_vs_fp_db", "ssim_generated_vs_fp")  # fidelity to FP: blank on the FP row


def evaluate_rows(bundle, rows: list[Row], n: int, seed: int, progress, edit: EditRun | None = None
                  ) -> tuple[list[dict], dict]:
    """Score every row against the first (FP); returns the table rows and the samples by name.
    ``edit``: every row edits its inputs instead of generating."""
    labels = fixed_labels(bundle.extra["model"].config.num_classes, n)
    samples, table = {}, []
    for row in progress(rows, desc="generating and scoring", unit="model"):
        if row.error is not None:  # nothing to draw: the row keeps the reason
            table.append({"name": row.name, "recipe": row.recipe, "bits": row.bits, "backend": row.backend,
                          "error": row.error})
            continue
        t0 = time.perf_counter()
        if edit is None:
            samples[row.name] = draw(bundle, row.step, labels, seed, row.name, row.head)
        else:
            samples[row.name], recon, keep = draw_edit(bundle, row.step, edit, seed, row.name)
        seconds = time.perf_counter() - t0
        fp, s = samples[rows[0].name], samples[row.name]
        if edit is None:
            metrics = score(fp, s)
        else:
            from evaluation.images import edit_scores

            labels_ok = s.labels is not None and min(s.labels) >= 0
            metrics = {k: v for k, v in edit_scores(s.images, recon, keep, s.labels if labels_ok else None,
                                                    None if s is fp else fp.images).items() if v is not None}
        if row is rows[0]:  # fidelity of FP to itself is trivially perfect: leave it blank
            metrics = {k: v for k, v in metrics.items() if k not in VS_FP}
        table.append({"name": row.name, "recipe": row.recipe, "bits": row.bits, "backend": row.backend,
                      "generation_s": seconds, **metrics})
    return table, samples


EDIT_GRID = "images/edit_side_by_side.png"


def write_grids(out: Path, samples: dict, columns: int, inputs: np.ndarray | None = None, edit_rows: int = 10
                ) -> dict[str, str]:
    """One PNG grid per row under ``out/images/``; returns {row name: relative path}. With the edits'
    ``inputs``, also ``EDIT_GRID``: per input (the first ``edit_rows``), the input and every row's edit."""
    from PIL import Image

    from evaluation.images import grid

    (out / "images").mkdir(exist_ok=True)
    paths = {}
    for i, (name, s) in enumerate(samples.items()):
        rel = f"images/{i:02d}_{''.join(c if c.isalnum() else '_' for c in name).strip('_').lower()}.png"
        img = grid(s.images, cols=columns)
        Image.fromarray(img if img.shape[-1] == 3 else np.repeat(img, 3, axis=-1)).save(out / rel)
        paths[name] = rel
    if inputs is not None:  # edits: input | each row's edit, side by side, for the first few inputs
        rows = np.stack([inputs[:edit_rows], *(s.images[:edit_rows] for s in samples.values())], 1)
        Image.fromarray(grid(rows.reshape(-1, *rows.shape[2:]), cols=rows.shape[1])).save(out / EDIT_GRID)
        paths["side by side"] = EDIT_GRID
    return paths


COLUMNS = (("model", "name", "{}"), ("runs on", "backend", "{}"), ("tokens = FP", "token_agreement", "{:.1%}"),
           ("token cos vs FP", "token_cosine", "{:.4f}"), ("token rel. MSE", "token_rel_mse", "{:.2e}"),
           ("images = FP", "identical_images", "{:.0%}"), ("PSNR vs FP", "psnr_db", "{:.1f} dB"),
           ("PSNR kept vs input", "psnr_kept_db", "{:.1f} dB"),
           ("PSNR generated vs FP", "psnr_generated_vs_fp_db", "{:.1f} dB"),
           ("SSIM generated vs FP", "ssim_generated_vs_fp", "{:.3f}"),
           ("MNIST-FID", "mnist_fid", "{:.1f}"), ("class accuracy", "class_accuracy", "{:.1%}"),
           ("not compared", "error", "error: {}"))


def table_rows(section: dict) -> tuple[list[str], list[list[str]]]:
    """The quality table as text cells (report.md and the compile summary share it)."""
    cols = [c for c in COLUMNS if any(c[1] in r for r in section["rows"])]
    return [c[0] for c in cols], [[fmt.format(r[key]) if r.get(key) is not None else "—" for _, key, fmt in cols]
                                  for r in section["rows"]]
