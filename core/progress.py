"""Progress bars and messages on stderr: what every long loop and every command uses."""
from __future__ import annotations

import os
import sys
from typing import Iterable

from tqdm import tqdm


def progress(iterable: Iterable, *, desc: str = "", unit: str = "it", total: int | None = None) -> Iterable:
    """A tqdm progress bar with ETA on stderr (plain lines when stderr is not a terminal)."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False,
                disable=os.environ.get("ARVGQ_NO_PROGRESS") == "1")


def no_progress(iterable: Iterable, **_kw) -> Iterable:
    return iterable


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
