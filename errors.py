"""The one way errors reach a user: `UserError` for what they must fix, one line on stderr, exit 2.

Every module may import this one; it imports nothing of the project.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user must fix (bad path, bad flag, mismatching resume): one line, exit 2."""


def log(message: str) -> None:
    """Progress and summaries go to stderr, so stdout stays free for machine-readable output."""
    print(message, file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
