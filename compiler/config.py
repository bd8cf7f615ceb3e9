"""What one compilation is asked to do, as typed values (the CLIs fill it from their arguments)."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "builtin:mnist-var"


@dataclass
class CalibrationConfig:
    """Where calibration inputs come from and how many.

    ``data``: a .pt list of input tuples; otherwise the bundle's own inputs, or (family models) ``samples``
    self-generated images, ``batch`` at a time, cached in ``cache``, from ``seed``; ``dgc`` selects among
    the generated sequences (none | reference | ranked; None: the recipe's ``[calibration]`` setting),
    generating ``dgc_candidates`` sequences per kept one (None: the recipe's; with DGC, ``samples`` is
    the number of kept sequences); ``resample`` redraws tokens per scale (VAR); ``iterations`` (MAR):
    which iterations of each generation are recorded, ``last`` (PTQ4ARVG) or ``all``.
    """

    data: str | None = None
    samples: int | None = None
    batch: int = 4
    cache: str = ".arvgq-cache"
    seed: int = 0
    dgc: str | None = None
    dgc_candidates: float | None = None
    resample: bool = False
    iterations: str | None = None  # MAR: calibrate on the last iteration (PTQ4ARVG) or all; None: the family's default


@dataclass
class EditTaskConfig:
    """``--evaluate N --task``: every model edits the same inputs instead of generating (VAR's zero-shot
    tasks): ``task`` inpaint | outpaint | edit, ``images`` (an .npz, a folder of PNGs or ``builtin:mnist``),
    ``box`` (``y0,x0,y1,x1``: fractions or pixels), ``classes`` (edit: the target classes)."""

    task: str
    images: str = "builtin:mnist"
    box: str = "0.25,0.25,0.75,0.75"
    classes: list[int] | None = None


@dataclass
class CompileConfig:
    """One compilation: the model, the recipe (or a pipeline and bits overriding it), the target,
    calibration, exclusions and the device calibration runs on.

    ``recipe`` None: ptq4arvg for family models, minmax otherwise. ``exclude``: user patterns (module
    globs or ``op:TYPE``), already read from any exclude files. ``evaluate``: images to score with FP,
    the compiled model and the ``compare`` (recipe, bits) baselines, generated or, with ``task``, edited.
    """

    model: str = DEFAULT_MODEL
    recipe: str | None = None
    pipeline: str | None = None
    bits: str | None = None
    target: str = "onnx"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    exclude: list[str] = field(default_factory=list)
    default_exclude: bool = True
    device: str = "cpu"
    allow_pickle: bool = False
    family: str | None = None
    tokenizer: str | None = None
    text_encoder: str | None = None  # text-to-image families: a local T5 directory
    prompts: list[str] | None = None  # their calibration prompts (None: the family's shipped file)
    stop_after: str | None = None
    disabled: list[str] = field(default_factory=list)
    site_sqnr: bool = True
    evaluate: int = 0
    compare: list[tuple[str, str]] = field(default_factory=list)
    task: EditTaskConfig | None = None  # score the evaluate images on an edit task instead of generation
