"""Generation jobs: images decoded one by one, batches saved as they finish (resumable, shardable), the outputs.

``BatchStore`` keeps ``OUT.partial/``: ``run.json`` (what determines the images) and one file per
batch, each written atomically, so a killed run leaves whole batches only and resumes there;
``torchrun`` ranks each take every K-th batch (``frontends.sampling.shard``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from core.errors import UserError
from core.io import atomic_torch_save, atomic_write_text
from evaluation.images import grid, load_samples, nhwc_uint8, to_uint8

# Zero-shot edits (VAR): the task, and whether the box is regenerated (True) or kept (False).
EDIT_TASKS = {"inpaint": True, "outpaint": False, "edit": True}
MNIST_INPUTS = "builtin:mnist"


def decode_each(tokenizer, tokens) -> np.ndarray:
    """Decode image by image: a convolution's rounding depends on the batch size (±1 in 0.03 % of
    LlamaGen's uint8 pixels between batches of 4 and 1), and an image must not depend on its batch."""
    n = len(tokens[0]) if isinstance(tokens, (list, tuple)) else len(tokens)
    one = (lambda i: [t[i: i + 1] for t in tokens]) if isinstance(tokens, (list, tuple)) else (lambda i: tokens[i: i + 1])
    return np.concatenate([to_uint8(tokenizer.decode(one(i))) for i in range(n)])


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world, local


def fingerprint(path: str | None) -> list | None:
    """Path, size and modification time: a changed file invalidates saved batches."""
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class BatchStore:
    """``OUT.partial/``: ``run.json`` (what determines the images) and ``batch_<k>.pt``, each
    written under a temporary name and renamed, so a killed run leaves whole batches only."""

    def __init__(self, directory: Path, settings: dict, n_batches: int):
        self.dir, self.n, self.settings = directory, n_batches, settings
        run = self.dir / "run.json"
        if run.is_file():
            saved = json.loads(run.read_text())
            if saved != settings:
                changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
                raise UserError(f"{self.dir} holds batches of another run (different {', '.join(changed)}); "
                                f"delete it or use another --out")

    def path(self, k: int) -> Path:
        return self.dir / f"batch_{k:06d}.pt"

    def missing(self) -> list[int]:
        return [k for k in range(self.n) if not self.path(k).is_file()]

    def save(self, k: int, tokens, images: np.ndarray, extra: dict[str, torch.Tensor] | None = None) -> None:
        if not (self.dir / "run.json").is_file():  # created with the first batch: a failed start leaves nothing
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "run.json", json.dumps(self.settings, indent=1))
        atomic_torch_save({"tokens": tokens, "images": torch.from_numpy(images), **(extra or {})}, self.path(k))

    def load_extra(self, key: str) -> torch.Tensor:
        """The ``extra`` tensor ``key`` of every batch, concatenated (edits: inputs' reconstructions)."""
        return torch.cat([torch.load(self.path(k), weights_only=True)[key] for k in range(self.n)])

    def load_all(self) -> tuple:
        """(tokens, images) of every batch in order; tokens concatenated per scale for VAR's lists."""
        parts = [torch.load(self.path(k), weights_only=True) for k in range(self.n)]
        images = torch.cat([p["images"] for p in parts]).numpy()
        first = parts[0]["tokens"]
        if isinstance(first, (list, tuple)):
            tokens = [torch.cat([p["tokens"][i] for p in parts]) for i in range(len(first))]
        else:
            tokens = torch.cat([p["tokens"] for p in parts])
        return tokens, images


def pick_device(choice: str, local_rank: int, uses_torch: bool) -> torch.device:
    if choice == "cuda" or (choice == "auto" and uses_torch and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return torch.device("cpu")


def write_edit_outputs(out: Path, inputs: np.ndarray, recon: np.ndarray, images: np.ndarray, keep: np.ndarray,
                       info: dict, fp: np.ndarray | None = None) -> None:
    """``edit.npz`` (per output image: ``inputs`` and ``recon``, the input's tokenizer reconstruction;
    ``keep``: the kept pixels; ``fp``: the FP model's edits beside a quantized run's), ``edit_grid.png``
    and ``edit.json`` (task, box, scores)."""
    from PIL import Image

    np.savez(out / "edit.npz", inputs=inputs, recon=recon, keep=keep, **({"fp": fp} if fp is not None else {}))
    # one row per output: input | reconstruction | (FP edit |) edit, so a glance shows what was kept
    columns = [inputs, recon, *([fp] if fp is not None else []), images]
    rows = np.stack(columns, 1).reshape(-1, *inputs.shape[1:])
    Image.fromarray(grid(rows, cols=len(columns))).save(out / "edit_grid.png")
    atomic_write_text(out / "edit.json", json.dumps(info, indent=1))


def write_outputs(out: Path, tokens, images: np.ndarray, labels: list[int]) -> None:
    from PIL import Image

    Image.fromarray(grid(images)).save(out / "grid.png")
    for i, (img, c) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(out / f"{i}_class{c}.png")
    np.savez(out / "samples.npz", images, np.asarray(labels, dtype=np.int64))
    torch.save(tokens, out / "tokens.pt")


def wait_for(store: BatchStore, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while store.missing() and time.monotonic() < deadline:
        time.sleep(1.0)
    missing = store.missing()
    if missing:
        raise UserError(f"{store.dir} lacks batches {missing[:8]}{' ...' if len(missing) > 8 else ''}: another rank "
                        f"is still running or stopped; run the command again (it resumes) or --merge once they finish")


# ----------------------------------------------------------------------------- zero-shot edits

class EditJob(NamedTuple):
    task: str
    box: tuple[float, float, float, float]  # fractions
    inputs: np.ndarray                      # uint8 [N, H, W, 3], the input of every output image
    recorded: list[int]                     # the label written to samples.npz


def load_edit_images(spec: str, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Images to edit as uint8 ``[N, H, W, 3]`` and their classes when known (else None).

    ``spec``: an ``.npz`` in the evaluator layout (``arr_0`` images, ``arr_1`` labels), a folder
    of PNGs (sorted by name), or ``builtin:mnist``, the 1,000 held-out MNIST digits (32x32).
    ``max_images`` keeps the first N.
    """
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images must be at least 1, got {max_images}")
    labels = None
    if spec != MNIST_INPUTS and not Path(spec).exists():
        raise UserError(f"--images not found: {spec}")
    if spec == MNIST_INPUTS:
        from evaluation.mnist import heldout_rgb

        images, labels = (t.numpy() for t in heldout_rgb(max_images))
    elif Path(spec).is_dir():
        from PIL import Image, UnidentifiedImageError

        files = sorted(Path(spec).glob("*.png"))[:max_images]
        if not files:
            raise UserError(f"--images folder {spec} holds no .png files")
        try:
            arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"--images: cannot read a PNG in {spec}: {e}") from None
        sizes = sorted({a.shape[:2] for a in arrays})
        if len(sizes) > 1:
            raise UserError(f"--images folder {spec} mixes image sizes {sizes}; all must be the tokenizer's size")
        images = np.stack(arrays)
    elif Path(spec).suffix == ".npz":
        samples = load_samples(spec)
        images, labels = samples.images[:max_images], samples.labels
        labels = None if labels is None else labels[:max_images]
    else:
        raise UserError(f"--images {spec}: expected an .npz (arr_0 uint8 images), a folder of PNGs or {MNIST_INPUTS}")
    images = nhwc_uint8(images).numpy()
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if len(images) == 0:
        raise UserError(f"--images {spec} holds no images")
    return images, (None if labels is None else np.asarray(labels, dtype=np.int64))


def parse_labels(classes: str, per_class: int = 1) -> list[int]:
    """``--classes 0,7`` -> ``[0, 7]``, each repeated ``per_class`` times."""
    try:
        labels = [int(c) for c in classes.split(",")]
    except ValueError:
        raise UserError(f"--classes must be integers separated by commas, got {classes!r}") from None
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {per_class}")
    return [c for c in labels for _ in range(per_class)]


def parse_box(text: str, height: int, width: int) -> tuple[float, float, float, float]:
    """``y0,x0,y1,x1`` -> fractions of the image. All four in [0, 1]: fractions; otherwise
    integer pixels within the image (``height x width``)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise UserError(f"--box must be four numbers y0,x0,y1,x1 (fractions in [0, 1] or pixels), got {text!r}")
    if not all(0 <= v <= 1 for v in values):
        if not all(v.is_integer() for v in values):
            raise UserError(f"--box {text}: pixels must be whole numbers, fractions must lie in [0, 1]")
        y0, x0, y1, x1 = values
        if min(values) < 0 or max(y0, y1) > height or max(x0, x1) > width:
            raise UserError(f"--box {text} lies outside the {height}x{width} images")
        values = [y0 / height, x0 / width, y1 / height, x1 / width]
    y0, x0, y1, x1 = values
    if not (y0 < y1 and x0 < x1):
        raise UserError(f"--box {text}: needs y0 < y1 and x0 < x1")
    return y0, x0, y1, x1


def edit_jobs(task: str, n_images: int, classes: list[int] | None, image_labels: np.ndarray | None,
              per_class: int) -> tuple[list[int], list[int], list[int]]:
    """What each output image is: (input image index, conditioning class, recorded label).

    ``edit``: every input image to every class of ``classes`` (output ``i * len(classes) + j``).
    ``inpaint``/``outpaint``: unconditional (the official class ``num_classes``), each image
    ``per_class`` times; the label recorded is the input's own class (-1 when unknown), so class
    accuracy measures whether the digit survived.
    """
    if task == "edit":
        if not classes:
            raise UserError("--task edit needs --classes (the target classes)")
        pairs = [(i, c) for i in range(n_images) for c in classes]
        return [i for i, _ in pairs], [c for _, c in pairs], [c for _, c in pairs]
    if classes is not None:
        raise UserError(f"--classes applies to --task edit; {task} is unconditional (the official class 1000)")
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {per_class}")
    sources = [i for i in range(n_images) for _ in range(per_class)]
    own = [-1 if image_labels is None else int(image_labels[i]) for i in sources]
    return sources, [-1] * len(sources), own


def to_unit_images(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1] (the tokenizers' input)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
