"""`Record`: what a run keeps for one image. The journal stores it, generation makes it, the writers read it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """What the run keeps for one image: the raw generated text, or why there is none.

    Best of N (`--candidates N`): `candidates` holds every caption the model wrote for the image, the
    generation's own best first, and `text` is the one the run keeps; `scores` holds, per reranker (its
    key, rerank.Reranker.key), the image-text similarity of each candidate (None for an empty one).
    Kept in the journal, so another reranker, or none, needs no generation.
    """

    id: str
    text: str = ""
    error: str | None = None  # None: generated
    candidates: tuple[str, ...] = ()
    scores: dict[str, tuple[float | None, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None
