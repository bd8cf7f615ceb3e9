"""What every command shares: one-line errors with a non-zero exit status."""
from __future__ import annotations

import sys
from typing import Callable

from core.errors import PassError, UserError


def main_wrapper(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn UserError into ``error: <message>`` on stderr and exit status 2 (PassError: 1)."""

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
