"""Stopping on Ctrl-C (SIGINT) or a scheduler's SIGTERM without losing work: one rule for every long loop
(generation, embedding, training).

Schedulers send SIGTERM at the time limit (Slurm then waits KillWait, 30 s by default, before SIGKILL);
Ctrl-C sends SIGINT. The first signal asks the loop to stop at its next safe point (after the batch in
hand, at the end of the optimizer step), where everything done so far is on disk; the exit code is
then 128 + the signal (130, 143). A second signal, or one outside the loop (start-up, writing), stops at
once: what the last safe point saved is kept. Under a launcher with several processes repeats are
ignored: launchers and schedulers signal every process, often more than once, and all processes must
stop at the same safe point.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import RESUME_HINT, exit_at_once, log


class StopSignals:
    """Catch SIGINT and SIGTERM for a block; the handlers in place before are restored after.

    `at` says where the loop stops ("after the current batch"); the loop checks `signum` at each safe
    point and sets `armed` while it runs. `hint` says how to continue after a stop at once; a callable is
    asked at that moment (before anything ran there is nothing to resume).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, at: str, distributed: bool = False, armed: bool = False,
                 hint: str | Callable[[], str] = RESUME_HINT):
        self.at = at
        self.distributed = distributed
        self.armed = armed
        self.hint = hint
        self.signum: int | None = None  # the first signal received
        self.previous: dict = {}

    def handler(self, signum, frame) -> None:
        if self.signum is not None and self.distributed:
            return
        if self.signum is not None or not self.armed:
            exit_at_once(signum, frame, self.hint() if callable(self.hint) else self.hint)
        self.signum = signum
        again = "" if self.distributed else " (again to stop now)"
        log(f"\n{signal.Signals(signum).name}: stopping {self.at}{again}")

    @contextmanager
    def armed_for(self) -> Iterator[None]:
        """The loop's block: a first signal now asks it to stop at its next safe point (not at once)."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {s: signal.signal(s, self.handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
