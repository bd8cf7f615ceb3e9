"""Recipes: a TOML file with a ``pipeline`` string, a ``bits`` setting, optional ``exclude`` patterns
and an optional ``[calibration]`` table (how self-generated calibration data is selected: DGC).

The built-in recipes are the ``*.toml`` files of this package (a package so that they ship with
the wheel); a user passes a path to their own copy.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from core.qmath import PRECISIONS, Precision, precision
from passes.infra import parse_pipeline

RECIPE_DIR = Path(__file__).parent
DGC_METHODS = ("none", "reference", "ranked")


@dataclass(frozen=True)
class RecipeCalibration:
    """A recipe's ``[calibration]`` table: how self-generated calibration sequences are selected.

    ``dgc``: Distribution-Guided Calibration (method.md §5.2), ``none`` | ``reference`` | ``ranked``
    (``--dgc`` overrides it). ``candidates``: candidate sequences generated per kept one, at least
    2: with CFG each image gives a conditional and an unconditional sequence, so 2 (the paper's
    256 -> 128) generates N images for ``--calib-samples N`` and keeps N of the 2N sequences; 4
    generates 2N images and keeps N of their 4N sequences. Only self-generated data is selected.
    """

    dgc: str = "none"
    candidates: float = 2.0

    @classmethod
    def parse(cls, table: object, where: str) -> RecipeCalibration:
        if not isinstance(table, dict):
            raise UserError(f"{where}: [calibration] must be a table, got {type(table).__name__}")
        unknown = set(table) - {"dgc", "candidates"}
        if unknown:
            raise UserError(f"{where}: unknown field(s) in [calibration]: {', '.join(sorted(unknown))} (known: dgc, candidates)")
        dgc = table.get("dgc", cls.dgc)
        if dgc not in DGC_METHODS:
            raise UserError(f"{where}: calibration.dgc must be one of {', '.join(DGC_METHODS)}, got {dgc!r}")
        candidates = table.get("candidates", cls.candidates)
        if isinstance(candidates, bool) or not isinstance(candidates, (int, float)) or not 2 <= candidates <= 64:
            raise UserError(f"{where}: calibration.candidates must be a number from 2 to 64 (candidate sequences per "
                            f"kept one; CFG gives 2 per image), got {candidates!r}")
        return cls(dgc, float(candidates))


@dataclass
class Recipe:
    name: str
    pipeline: str
    bits: str = "W8A8"
    description: str = ""
    exclude: list[str] = field(default_factory=list)
    source: str = ""
    calibration: RecipeCalibration = field(default_factory=RecipeCalibration)
    head_pipeline: str | None = None  # [head] pipeline: a family's second graph (MAR's diffusion head); None: FP
    head_fp_steps: int = 0  # [head] fp_steps: the first denoising steps of every sampling chain run the FP head

    @property
    def precision(self) -> Precision:
        return PRECISIONS[self.bits]


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a TOML file by path; errors name the file and the field."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise UserError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin_recipes())}, or give a .toml path")
    if not path.exists():
        raise UserError(f"recipe file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    unknown = set(data) - {"pipeline", "bits", "description", "exclude", "calibration", "head"}
    if unknown:
        raise UserError(f"recipe {path}: unknown field(s) {', '.join(sorted(unknown))}")
    if "pipeline" not in data:
        raise UserError(f"recipe {path}: missing field 'pipeline'")
    bits = data.get("bits", "W8A8")
    precision(bits, f"recipe {path}: bits")
    parse_pipeline(data["pipeline"])  # fail now, not halfway through a compile
    calibration = RecipeCalibration.parse(data.get("calibration", {}), f"recipe {path}")
    head = data.get("head", {})
    if not isinstance(head, dict) or set(head) - {"pipeline", "fp_steps"} or ("pipeline" not in head and head):
        raise UserError(f"recipe {path}: [head] must be a table with a pipeline (and optionally fp_steps)")
    if head:
        parse_pipeline(head["pipeline"])
    fp_steps = head.get("fp_steps", 0)
    if not isinstance(fp_steps, int) or isinstance(fp_steps, bool) or fp_steps < 0:
        raise UserError(f"recipe {path}: [head] fp_steps must be a whole number >= 0, got {fp_steps!r}")
    return Recipe(path.stem, data["pipeline"], bits, data.get("description", ""), list(data.get("exclude", [])), str(path),
                  calibration, head.get("pipeline"), fp_steps)
