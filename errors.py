"""The one way errors reach a user: `UserError` for what they must fix, one line on stderr, exit 2.

Every module may import this one; it imports nothing of the project.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user must fix (bad path, bad flag, mismatching resume): one line, exit 2."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM that must stop the program at once (during start-up, or a second one)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def log(message: str) -> None:
    """Progress and summaries go to stderr, so stdout stays free for machine-readable output."""
    print(message, file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entry point: a UserError becomes one line on stderr and exit code 2; Ctrl-C or SIGTERM
    that stops it at once becomes a line with the resume command and exit code 130 or 143."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"\nstopped by {signal.Signals(signum).name}; what was finished is kept: rerun the same command "
              "with --resume_from_checkpoint auto to continue", file=sys.stderr)
        return 128 + signum
