"""Recipes: a TOML file with a ``pipeline`` string, a ``bits`` setting and optional ``exclude`` patterns.

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


@dataclass
class Recipe:
    name: str
    pipeline: str
    bits: str = "W8A8"
    description: str = ""
    exclude: list[str] = field(default_factory=list)
    source: str = ""

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
    unknown = set(data) - {"pipeline", "bits", "description", "exclude"}
    if unknown:
        raise UserError(f"recipe {path}: unknown field(s) {', '.join(sorted(unknown))}")
    if "pipeline" not in data:
        raise UserError(f"recipe {path}: missing field 'pipeline'")
    bits = data.get("bits", "W8A8")
    precision(bits, f"recipe {path}: bits")
    parse_pipeline(data["pipeline"])  # fail now, not halfway through a compile
    return Recipe(path.stem, data["pipeline"], bits, data.get("description", ""), list(data.get("exclude", [])), str(path))
