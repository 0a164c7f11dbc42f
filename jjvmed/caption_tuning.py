"""Choosing the caption method on the validation split by the local relevance aggregate (scores.caption_scores).

The contenders: `knn` at each number of neighbours (computed here from the caption index and the validation
embeddings: no model), and every generate or rag run on the validation images, read from its journal (the
journal's settings say which method, k and N it was): its first candidate, and with candidates, the best of
N by each reranker that scored them. Every contender is scored on the same images (those every one has), with
the caption metrics that can run here: ROUGE-1 and BLEU always, BERTScore and BLEURT when their model folders
are given. The relevance aggregate of the parts that ran decides; the table says which parts those were.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .embeddings import Embeddings
from .errors import UserError
from .index import ConceptIndex
from .journal import read_journal
from .prompts import clean_caption
from .rerank import chosen

KNN_GRID = (1, 3, 5, 10, 20)  # neighbours: the nearest caption, then the consensus of more


@dataclass(frozen=True)
class Contender:
    name: str  # how the table shows it
    options: str  # the generate_captions.py options that give it
    captions: dict[str, str]  # ID -> caption as the CSV would have it


def knn_contenders(index: ConceptIndex, emb: Embeddings, ids: list[str], device: str = "cpu",
                   grid: tuple[int, ...] = KNN_GRID) -> list[Contender]:
    from .retrieval import consensus, nearest_captions

    grid = tuple(k for k in grid if k <= len(index.ids))
    neighbours = nearest_captions(index, emb, ids, max(grid), device)
    out = []
    for k in grid:
        captions = {i: clean_caption(consensus(c[:k])) for i, c in neighbours.items()}
        out.append(Contender(f"knn, {k} neighbour{'s' if k > 1 else ''}", f"--method knn --neighbours {k}", captions))
    return out


def journal_contenders(path: str | Path) -> list[Contender]:
    """A run's journal: its first candidates (its captions, without candidates), and the best of N by each
    reranker whose scores it holds."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist (a generate_captions.py journal, <output stem>.journal.jsonl)")
    try:
        contents = read_journal(path)
    except UserError:  # its own advice ("move it away") is for a journal at a run's output path, not an input
        raise UserError(f"--journals {path} is not a generate_captions.py journal: give the run's "
                        "<output stem>.journal.jsonl, not its CSV") from None
    if contents is None or not contents.records:
        raise UserError(f"{path} holds no records")
    settings = contents.header.get("settings") if isinstance(contents.header.get("settings"), dict) else {}
    if settings.get("task") != "caption":
        raise UserError(f"{path} is not the journal of a caption run (task {settings.get('task')!r})")
    retrieval = settings.get("retrieval")
    generation = settings.get("generation")
    try:  # written by the tool, but a journal is a file a user can edit
        n = int((generation if isinstance(generation, dict) else {}).get("num_return_sequences", 1))
        neighbours = int(retrieval["neighbours"]) if retrieval else 0
    except (TypeError, ValueError, KeyError):
        raise UserError(f"{path}: its header's settings cannot be read (num_return_sequences, retrieval)") from None
    method = f"rag, {neighbours} neighbours" if retrieval else "generate"
    options = f"--method rag --neighbours {neighbours}" if retrieval else "--method generate"
    records = {i: r for i, r in contents.records.items() if r.ok}
    label = f"{method} ({path.name})"
    if n == 1:
        return [Contender(label, options, {i: clean_caption(r.text) for i, r in records.items()})]
    out = [Contender(f"{label}, first of {n}", f"{options} --candidates {n}",
                     {i: clean_caption(chosen(r, None).text) for i, r in records.items()})]
    keys = sorted({k for r in records.values() for k in r.scores})
    for key in keys:
        scored = {i: r for i, r in records.items() if key in r.scores}
        out.append(Contender(f"{label}, best of {n} by {key}", f"{options} --candidates {n} --rerank_model "
                             f"<the folder of {key.rpartition('@')[0]}>",
                             {i: clean_caption(chosen(r, key).text) for i, r in scored.items()}))
    return out


@dataclass(frozen=True)
class Scored:
    contender: Contender
    summary: dict  # scores.caption_scores' summary

    @property
    def relevance(self) -> float:
        if "relevance" in self.summary:
            return self.summary["relevance"]
        value = self.summary["relevance_partial"]["value"]
        return value if value is not None else 0.0


def score_contenders(gt: dict[str, str], contenders: list[Contender], bertscore_model: str | None = None,
                     bertscore_layers: int | None = None, bleurt_model: str | None = None,
                     bleurt_batch_size: int = 8) -> tuple[list[Scored], list[str]]:
    """Every contender scored on the images of `gt` that every contender has; (rows best first, those IDs)."""
    from .scores import caption_scores

    ids = [i for i in gt if all(i in c.captions for c in contenders)]
    if not ids:
        raise UserError("no validation image is in every contender (do the journals and embeddings cover the "
                        "validation images of the ground truth?)")
    rows = []
    for c in contenders:
        summary, _ = caption_scores({i: gt[i] for i in ids}, {i: c.captions[i] for i in ids}, bertscore_model,
                                    bertscore_layers, bleurt_model, bleurt_batch_size)
        rows.append(Scored(c, summary))
    return sorted(rows, key=lambda r: -r.relevance), ids


def parts_that_ran(summary: dict) -> str:
    from .scores import describe_partial

    if "relevance" in summary:
        return "relevance: every part ran"
    return f"relevance {describe_partial(summary['relevance_partial'])}"


def format_table(rows: list[Scored]) -> str:
    metrics = [("rouge1", "ROUGE-1"), ("bleu1", "BLEU-1"), ("bleu4", "BLEU-4"), ("bertscore_f1", "BERTScore"),
               ("bleurt", "BLEURT")]
    shown = [(k, label) for k, label in metrics if any(k in r.summary for r in rows)]
    width = max(len(r.contender.name) for r in rows)
    lines = [f"{'method':<{width}}  " + "  ".join(f"{label:>9}" for _, label in shown) + "  relevance"]
    for r in rows:
        lines.append(f"{r.contender.name:<{width}}  " + "  ".join(f"{r.summary[k]:9.4f}" for k, _ in shown)
                     + f"  {r.relevance:9.4f}")
    return "\n".join(lines)
