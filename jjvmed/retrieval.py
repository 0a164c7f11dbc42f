"""Nearest training captions, for `generate_captions.py --method knn|rag`.

A caption index is a concept index fitted with the training captions (`concept_index.py fit
--train_captions`). An image's neighbours are the training images whose vectors are closest to its own:
exact cosine search (index.nearest) over the mean of the cosines of every encoder of the index (with one
encoder, its cosine), so retrieving with BiomedCLIP or MedSigLIP is an index fitted on their embeddings.

- `knn` keeps the caption of the nearest training image; with k > 1 neighbours, the consensus caption of
  the k nearest: the one that agrees most (summed unigram F1, the official preprocessing) with the others,
  the nearer on a tie. Copying the nearest training caption has long been a strong baseline in this task.
- `rag` puts the k nearest captions, nearest first, into the prompt (prompts.rag_prompt).

The run's image vectors come from `--embeddings` (embeddings.ensure_embeddings): the vectors stored there of
images whose files are unchanged are reused, the others embedded with the index's encoders. Under shards the
file is made beforehand and only read: one process writes a file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embeddings import (
    Embedded,
    Embeddings,
    EmbedOptions,
    check_has_ids,
    ensure_embeddings,
    load_embeddings,
    plan_embeddings,
)
from .errors import UserError
from .files import file_identity, lock_exclusive
from .index import ConceptIndex, nearest

DEFAULT_NEIGHBOURS = {"knn": 1, "rag": 3}  # rag: the 3 captions the second-best 2026 team gave its model


def check_caption_index(index: ConceptIndex, where: str) -> None:
    if index.captions is None:
        raise UserError(f"the index in {where} has no captions: fit it with --train_captions ID,Caption "
                        "(concept_index.py fit)")


def stacked(parts: list[np.ndarray]) -> np.ndarray:
    """Several encoders' unit vectors side by side: the dot product of two such rows is the sum of the cosines."""
    return parts[0] if len(parts) == 1 else np.ascontiguousarray(np.concatenate(parts, axis=1))


def query_vectors(index: ConceptIndex, emb: Embeddings, what: str) -> np.ndarray:
    """The embeddings' vectors of every encoder of the index, side by side, in the index's order."""
    return stacked([member.queries(emb, what) for member in index.members])


def neighbour_rows(index: ConceptIndex, emb: Embeddings, ids: list[str], k: int, device: str = "cpu"
                   ) -> dict[str, np.ndarray]:
    """ID -> index rows of its k nearest training images, nearest first, for the `ids` that have a vector."""
    position = {i: n for n, i in enumerate(emb.ids)}
    wanted = [i for i in ids if i in position]
    if not wanted:
        return {}
    queries = query_vectors(index, emb, "the caption index")[[position[i] for i in wanted]]
    _, rows = nearest(stacked([m.vectors for m in index.members]), queries, k, device)
    return dict(zip(wanted, rows, strict=True))


def nearest_captions(index: ConceptIndex, emb: Embeddings, ids: list[str], k: int, device: str = "cpu"
                     ) -> dict[str, list[str]]:
    """ID -> the captions of its k nearest training images, nearest first (IDs without a vector left out)."""
    return {i: [index.captions[r] for r in rows] for i, rows in neighbour_rows(index, emb, ids, k, device).items()}


def words(caption: str) -> Counter:
    from .scores import preprocess_caption

    return Counter(preprocess_caption(caption).split())


def unigram_f1(a: Counter, b: Counter) -> float:
    """ROUGE-1 F of two bags of words (clipped counts, no stemming: the official setting)."""
    overlap = sum((a & b).values())
    return 2 * overlap / (sum(a.values()) + sum(b.values())) if overlap else 0.0


def consensus(captions: list[str]) -> str:
    """The caption that agrees most with the others (summed unigram F1), the first (nearest) of equals."""
    if len(captions) <= 1:
        return captions[0] if captions else ""
    bags = [words(c) for c in captions]
    agreement = [sum(unigram_f1(b, other) for m, other in enumerate(bags) if m != n) for n, b in enumerate(bags)]
    return captions[int(np.argmax(agreement))]  # argmax takes the first of equal values


EMBED_FIRST = ("embed the images once first (concept_index.py embed --image_dir ... with the index's encoders) and "
               "give that file with --embeddings")


@dataclass(frozen=True)
class Retrieval:
    """What a caption run retrieves with: the caption index, how many neighbours, the run's image vectors."""
    index: ConceptIndex  # checked to hold captions (check_caption_index) when it was loaded
    neighbours: int
    embeddings: Path  # the run's vectors (embeddings.ensure_embeddings keeps them up to date)
    options: EmbedOptions  # how they are embedded: the index's encoders and pooling
    device: str = "cpu"  # where the search runs
    read_only: bool = False  # the file is given and only read: under shards (one process writes a file)

    def settings(self) -> dict:
        """What decides the retrieved captions; a generate journal records it (a resume with another index or k
        is refused)."""
        return {"neighbours": self.neighbours, "index": self.index.meta.get("fingerprint"),
                "encoders": [m.label for m in self.index.members]}

    def outputs(self) -> list[str]:
        return [] if self.read_only else [str(self.embeddings)]

    def check(self) -> None:
        """Before any model loads: a file that is only read has the index's encoders."""
        if self.read_only and self.embeddings.exists():
            query_vectors(self.index, load_embeddings(self.embeddings), "the caption index")

    @contextmanager
    def prepared(self, items: list[tuple[str, str]]) -> Iterator[None]:
        """Held while a run uses the vectors of (ID, path) images, entered before any model loads: the file's lock
        (when this run writes it), and every conflict refused at once (vectors it would drop; under shards, an
        image the file lacks or that changed since it was made)."""
        if self.read_only:
            self.check_stored(items)
            yield
            return
        with lock_exclusive(self.embeddings, "give this run another --embeddings"):
            plan = plan_embeddings(items, self.embeddings, self.options)
            plan.check(self.embeddings)
            if plan.missing([i for i, _ in items]):
                from .fusion import check_model_matches

                check_model_matches(self.options.base_model_path, self.index)  # every encoder there to embed with
            yield

    def check_stored(self, items: list[tuple[str, str]]) -> None:
        emb = load_embeddings(self.embeddings, vectors=False)
        check_has_ids(emb, [i for i, _ in items], self.embeddings, "images of this run", EMBED_FIRST)
        embedded = set(emb.ids)
        stale = [i for i, p in items if i in embedded and emb.identities.get(i) != file_identity(p)]
        if stale:
            raise UserError(f"{len(stale)} images of this run changed since {self.embeddings} was made, or it does not "
                            f"record their files (first: {', '.join(stale[:3])}): {EMBED_FIRST}")

    def vectors(self, items: list[tuple[str, str]], encoder=None) -> Embedded:
        """The vectors of (ID, path) images, inside `prepared`. `encoder`: LLaVA's tower already loaded, for the
        'llava' encoder."""
        if self.read_only:
            return Embedded(load_embeddings(self.embeddings), len(items), 0, 0, 0.0)
        return ensure_embeddings(items, self.embeddings, self.options, encoder, locked=True)

    def captions(self, emb: Embeddings, ids: list[str]) -> dict[str, list[str]]:
        return nearest_captions(self.index, emb, ids, self.neighbours, self.device)
