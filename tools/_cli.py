"""What every command shares: one-line errors with exit status 2, progress bars, atomic outputs."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from passes.diagnostics import PassError, UserError


def progress(iterable: Iterable, *, desc: str = "", unit: str = "it", total: int | None = None) -> Iterable:
    """A tqdm progress bar with ETA on stderr (plain lines when stderr is not a terminal)."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False,
                disable=os.environ.get("ARVGQ_NO_PROGRESS") == "1")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main_wrapper(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn UserError into ``error: <message>`` on stderr and exit status 2."""

    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except PassError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130

    return wrapped


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, force: bool):
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    An existing ``out`` is an error unless ``force``; then it is replaced at the very end,
    so a failed run leaves the old results (and no partial new ones).
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"output directory {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
