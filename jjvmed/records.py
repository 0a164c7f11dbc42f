"""`Record`: what a run keeps for one image. The journal stores it, generation makes it, the writers read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """What the run keeps for one image: the raw generated text, or why there is none."""

    id: str
    text: str = ""
    error: str | None = None  # None: generated

    @property
    def ok(self) -> bool:
        return self.error is None
