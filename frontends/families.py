"""Model families (VAR, LlamaGen, RAR, PAR, Infinity): detection from checkpoint keys and bundle builders.

Each family module registers a ``Family``. ``detect`` looks at the keys (and shapes) of a
state_dict and returns the name of the matching config, or None; ``build`` turns the
state_dict into a ModelBundle (strict load).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core.errors import UserError
from frontends.generic import ModelBundle


@dataclass
class Family:
    name: str
    detect: Callable[[dict], str | None]
    build: Callable[..., ModelBundle]


FAMILIES: dict[str, Family] = {}


def meta_model(cls: Callable, cfg: Any):
    """``cls(cfg)`` on the meta device: its parameter names and shapes, no memory, no init."""
    import torch

    with torch.device("meta"):
        return cls(cfg)


def layout(cls: Callable, cfg: Any) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of ``cls(cfg)``: what a checkpoint of that configuration holds."""
    return {k: tuple(v.shape) for k, v in meta_model(cls, cfg).state_dict().items()}


def tensor_shape(state_dict: dict, key: str, family: str) -> tuple[int, ...]:
    """The shape of a checkpoint tensor a family reads its configuration from, or a one-line error."""
    import torch

    value = state_dict.get(key)
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{family} checkpoint has no tensor {key!r}: cannot infer its configuration")
    return tuple(value.shape)


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


FAMILY_MODULES = ("frontends.var", "frontends.llamagen", "frontends.rar", "frontends.par", "frontends.infinity",
                  "frontends.mar")


def _load_builtin_families() -> None:
    """Import every family module that exists; each registers itself."""
    import importlib
    import importlib.util

    for name in FAMILY_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def detect(state_dict: dict) -> tuple[str, str]:
    _load_builtin_families()
    for fam in FAMILIES.values():
        config = fam.detect(state_dict)
        if config is not None:
            return fam.name, config
    sample = ", ".join(list(state_dict)[:5])
    raise UserError(f"checkpoint matches no known family ({', '.join(FAMILIES) or 'none registered'}); "
                    f"first keys: {sample}. Pass --family, or give file.py:factory for a generic module")


def bundle_from_state_dict(state_dict: dict, path: Path, family: str | None = None, **options: Any) -> ModelBundle:
    _load_builtin_families()
    if family is not None:
        if family not in FAMILIES:
            raise UserError(f"unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}")
        fam, config = FAMILIES[family], FAMILIES[family].detect(state_dict)
    else:
        name, config = detect(state_dict)
        fam = FAMILIES[name]
    return fam.build(state_dict, path=path, config=config, **options)
