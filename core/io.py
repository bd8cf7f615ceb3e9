"""Files that appear whole or not at all: the one atomic-write helper and the atomic output directory."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from core.errors import PassError, UserError


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` (one rename) only if the block succeeds.

    Readers never see a half-written file, and a failed write leaves no temporary behind.
    ``suffix`` keeps the extension for writers that infer the format from it (PIL, onnx).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_torch_save(obj, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def failed_dir(out: str | Path) -> Path:
    """Where a failed run's partial output (the dumps a user debugs with) is kept: ``OUT.failed/``."""
    out = Path(out)
    return out.with_name(out.name + ".failed")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    An existing ``out`` is an error unless ``force``; then it is replaced at the very end, so a
    failed run leaves the old results. What a failed run did write (pass dumps) moves to
    ``OUT.failed/`` and the error says so; a run that failed before writing anything leaves nothing.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"output directory {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
    except (UserError, PassError) as e:
        if not any(tmp.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        kept = failed_dir(out)
        shutil.rmtree(kept, ignore_errors=True)
        os.replace(tmp, kept)
        raise type(e)(f"{e} (partial output kept in {kept}/)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(failed_dir(out), ignore_errors=True)  # a good run replaces the last failure's leftovers
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
