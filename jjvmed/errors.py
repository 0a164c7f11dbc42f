"""The one way errors reach a user: `UserError` for what they must fix, one line on stderr, exit 2.

Every module may import this one; it imports nothing of the project.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user must fix (bad path, bad flag, mismatching resume): one line, exit 2."""


def log(message: str) -> None:
    """Progress and summaries go to stderr, so stdout stays free for machine-readable output."""
    print(message, file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# What an exit at once must still undo, as os._exit skips every `finally`: the lock side files (and the folders
# made for them) of files.lock_exclusive. Key: any object unique to the holder; value: the undoing.
UNDO_AT_EXIT: dict[object, Callable[[], None]] = {}

RESUME_HINT = "what was finished is kept: rerun the same command with --resume_from_checkpoint auto to continue"


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None, hint: str = RESUME_HINT) -> int:
    """Run an entry point: a UserError becomes one line on stderr and exit code 2; Ctrl-C or SIGTERM
    becomes a line with `hint` (how to continue) and exit code 130 or 143."""
    on_signal = functools.partial(exit_at_once, hint=hint)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(stopped_message(signal.SIGINT, hint), file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        # Called from the command line (argv None), the program ends next: a late signal must not turn
        # the exit code already decided into a traceback at shutdown. Called in-process, restore.
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if argv is None else handler)


def stopped_message(signum: int, hint: str) -> str:
    return f"\nstopped by {signal.Signals(signum).name}" + (f"; {hint}" if hint else "")


def exit_at_once(signum, frame, hint: str = RESUME_HINT) -> None:
    """Ctrl-C or SIGTERM outside the generation loop (start-up, writing): exit now, cleanly.

    Nothing is lost: the journal is flushed after every batch, CSVs are written atomically and
    the lock dies with the process (its side file is removed here, as a normal end removes it).
    Raising KeyboardInterrupt instead can land inside a library's import or finalizer and end in a
    traceback.
    """
    print(stopped_message(signum, hint), file=sys.stderr, flush=True)
    end_worker_processes()
    for undo in reversed(list(UNDO_AT_EXIT.values())):  # the innermost first, as the blocks would end
        try:
            undo()
        except OSError:
            pass  # what cannot be removed stays: an unlocked side file blocks nothing
    os._exit(128 + signum)


def end_worker_processes() -> None:
    """Kill this process's worker processes (image decoding) before an exit that skips their shutdown.

    They ignore Ctrl-C and SIGTERM (the main process decides when to stop). Left behind, they wait
    seconds before noticing the main process is gone, and one handing over a batch at that moment
    prints a ConnectionResetError traceback into the terminal.
    """
    multiprocessing = sys.modules.get("multiprocessing")  # not imported: no workers (and no import in a handler)
    if multiprocessing is None:
        return
    for child in multiprocessing.active_children():
        try:
            child.kill()
        except OSError:
            pass  # already gone


@contextmanager
def quiet_library_deprecations():
    """PEFT and transformers' Trainer call transformers' own deprecated names: FutureWarnings a user cannot
    act on, printed into every run's log. Only those are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*(is_gradient_checkpointing|gradient_checkpointing_enable).*",
                                FutureWarning)
        yield


def quiet_unused_bitsandbytes() -> None:
    """PEFT imports bitsandbytes wherever it is installed, and bitsandbytes logs at import that an optional
    package of faster CPU kernels is missing: noise on runs that never use bitsandbytes (only --load_in_4bit
    does). Only that line of that logger is dropped, for the rest of the process."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, KernelsNotice) for f in logger.filters):
        logger.addFilter(KernelsNotice())


class KernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels" not in record.getMessage()
