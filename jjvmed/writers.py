"""Writers of a run's output files (pipeline.run): records in, CSVs out, each written once, atomically.

- `CaptionWriter`: ID,Caption from the raw answers;
- `ConceptWriter`: format A (ID,Concepts: the phrases the model named) and format B (ID,CUIs): the
  phrases mapped to CUIs, or CUIs from image vectors (kNN / probe), or both fused, as tuned settings say.

A failed or missing image gets an empty answer, so every selected ID has its row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cui_mapper import CuiMapper, unmapped_report
from .errors import log
from .files import write_csv_atomic
from .pipeline import RunResult
from .prompts import clean_caption
from .submission import MAX_CONCEPTS

SHOWN_PHRASE = 60  # characters of an unmapped phrase shown in the summary (degenerate answers run for kilobytes)


def answer(result: RunResult, image_id: str) -> str:
    """The raw answer of an image; empty if it failed or is missing."""
    record = result.records.get(image_id)
    return record.text if record and record.ok else ""


class CaptionWriter:
    def __init__(self, output_csv: str):
        self.output_csv = output_csv
        self.submission = output_csv

    def outputs(self) -> list[str]:
        return [self.output_csv]

    def write(self, ids: list[str], result: RunResult) -> list[Path]:
        rows = ([i, clean_caption(answer(result, i))] for i in ids)
        return [write_csv_atomic(self.output_csv, ["ID", "Caption"], rows)]


@dataclass(frozen=True)
class VisionMethod:
    """A concept index and the tuned settings of one method on it (knn, probe or fused)."""

    name: str
    index: object  # index.ConceptIndex
    settings: dict
    device: str = "auto"  # where the kNN search and the probe run


def natural_path(output_csv: str, output_csv_natural: str | None) -> str:
    """Format A's file: given, or beside format B, so two experiments never overwrite each other's."""
    if output_csv_natural:
        return output_csv_natural
    out = Path(output_csv)
    return str(out.with_name(f"{out.stem}_natural.csv"))


def unmapped_path(output_csv: str) -> Path:
    return Path(output_csv).with_name(f"{Path(output_csv).stem}.unmapped.csv")


def split_natural(field: str) -> list[str]:
    """The phrases of a format-A field (joined by ';')."""
    return [p for p in field.split(";") if p.strip()]


class ConceptWriter:
    """Format A and/or format B.

    read: a raw answer -> its concept phrases (prompts.parse_answer for generated text, split_natural for
        format A read back), or None when the records hold no text (kNN / probe);
    natural_csv: where format A goes (None: not written);
    output_csv: where format B goes (None: --no-auto_map_cuis, format A only);
    mapper: phrases -> CUIs; vision: CUIs from the image vectors, fused with the mapped ones as its
    settings say; given_cuis: generated CUIs read from a file instead of mapped (concept_index.py predict).
    """

    def __init__(self, output_csv: str | None, natural_csv: str | None = None, mapper: CuiMapper | None = None,
                 read: Callable[[str], list[str]] | None = None, vision: VisionMethod | None = None,
                 given_cuis: dict[str, list[str]] | None = None):
        self.output_csv = output_csv
        self.natural_csv = natural_csv
        self.mapper = mapper
        self.read = read
        self.vision = vision
        self.given_cuis = given_cuis
        self.submission = output_csv

    def outputs(self) -> list[str]:
        return [p for p in (self.output_csv, self.natural_csv) if p]

    def write(self, ids: list[str], result: RunResult) -> list[Path]:
        written = []
        phrases = {i: self.read(answer(result, i)) for i in ids} if self.read else None
        if self.natural_csv and phrases is not None:
            written.append(write_csv_atomic(self.natural_csv, ["ID", "Concepts"],
                                            ([i, ";".join(phrases[i])] for i in ids)))
        if self.output_csv is None:
            return written
        generated, unmapped = self.given_cuis, Counter()
        if phrases is not None and self.mapper is not None:
            generated, unmapped = map_phrases(ids, phrases, self.mapper)
        if self.vision is not None:
            cuis = self.vision_cuis(ids, result, generated)
        else:
            cuis = generated or {}
            log(cui_summary(ids, cuis))
        written.append(write_csv_atomic(self.output_csv, ["ID", "CUIs"], ([i, ";".join(cuis.get(i, []))] for i in ids)))
        report = unmapped_path(self.output_csv)
        if unmapped:
            written.append(unmapped_report(unmapped, report))
            top = ", ".join(f"{shown(p)!r} x{n}" for p, n in unmapped.most_common(10))
            log(f"unmapped phrases: {sum(unmapped.values())} ({len(unmapped)} distinct); most frequent: {top}")
        elif phrases is not None:
            report.unlink(missing_ok=True)
        return written

    def vision_cuis(self, ids: list[str], result: RunResult, generated: dict[str, list[str]] | None
                    ) -> dict[str, list[str]]:
        """The CUIs of the image vectors (and the generated CUIs, if the settings fuse them)."""
        from .fusion import predict_concepts, uses_generated

        vision = self.vision
        fused = predict_concepts(vision.index, vision.settings, result.embeddings,
                                 generated if uses_generated(vision.settings) else None, device=vision.device)
        counts = [len(fused.get(i, [])) for i in ids]
        # which settings: the tune table's row they were chosen from (knn, probe, knn+probe, ...)
        line = (f"CUIs (--method {vision.name}, the settings of tune's row {vision.settings['source']!r}): "
                f"{sum(counts) / max(len(counts), 1):.2f} per image, {counts.count(0)} images without any")
        if generated is not None:
            changed = sum(1 for i in ids if fused.get(i, []) != generated.get(i, []))
            line += f", {changed} differ from the generated CUIs"
        log(line)
        return fused


def shown(phrase: str) -> str:
    return phrase if len(phrase) <= SHOWN_PHRASE else phrase[:SHOWN_PHRASE] + "..."


def map_phrases(ids: list[str], phrases: dict[str, list[str]], mapper: CuiMapper
                ) -> tuple[dict[str, list[str]], Counter]:
    """ID -> the CUIs its phrases map to (at most the platform's limit), and a count of the phrases no CUI matched."""
    unmapped: Counter = Counter()
    out = {}
    for image_id in ids:
        cuis, missed = mapper.map_phrases(phrases[image_id], limit=MAX_CONCEPTS)
        unmapped.update(missed)
        out[image_id] = cuis
    return out, unmapped


def cui_summary(ids: list[str], cuis: dict[str, list[str]]) -> str:
    counts = [len(cuis.get(i, [])) for i in ids]
    distinct = len({c for i in ids for c in cuis.get(i, [])})
    return (f"CUIs: {sum(counts) / max(len(counts), 1):.2f} per image, {counts.count(0)} images without any, "
            f"{distinct} distinct")
