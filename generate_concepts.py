"""Concept detection: a folder of medical images -> concept phrases (format A) and UMLS CUIs (format B).

    python generate_concepts.py --image_dir /data/test/images --output_csv results/concepts.csv \\
        --output_csv_natural results/concepts_natural.csv --cui_mapping_file data/cui_names.csv
    # a new mapping file later, no GPU needed:
    python generate_concepts.py --from_natural_csv results/concepts_natural.csv \\
        --output_csv results/concepts_v2.csv --cui_mapping_file cui_mapping_2025.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from pathlib import Path

import common
from cui_mapper import CuiMapper, parse_answer, unmapped_report
from errors import UserError, log, run_cli
from files import write_csv_atomic

DEFAULT_MAPPING = Path(__file__).resolve().parent / "data" / "cui_names.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Detect medical concepts in every image of a folder with LLaVA-LLaMA-3-8B + the JJ-VMed LoRA "
        "adapter: natural-language concepts (format A, ID,Concepts) and UMLS CUIs for an ImageCLEFmedical "
        "concept-detection submission (format B, ID,CUIs).",
    )
    common.add_common_arguments(parser, task="concepts")
    group = parser.add_argument_group("concepts")
    group.add_argument("--output_csv_natural", default=None,
                       help="format A: the concept phrases the model named, joined by ';' (default: beside "
                       "--output_csv, named <its name>_natural.csv)")
    group.add_argument("--cui_mapping_file", default=str(DEFAULT_MAPPING),
                       help="CSV with a CUI column and a name column (Name, Canonical name, Preferred_name or "
                       "STR), optionally Synonyms (';'-separated) (default: the shipped data/cui_names.csv)")
    group.add_argument("--auto_map_cuis", action=argparse.BooleanOptionalAction, default=True,
                       help="map the phrases to CUIs and write --output_csv (format B); --no-auto_map_cuis writes "
                       "format A only (default: on)")
    group.add_argument("--from_natural_csv", default=None, metavar="PATH",
                       help="skip the model: re-map an existing format-A file to format B with --cui_mapping_file")
    return parser


def natural_path(output_csv: str, output_csv_natural: str | None) -> str:
    """Format A's file: given, or beside format B, so two experiments never overwrite each other's."""
    if output_csv_natural:
        return output_csv_natural
    out = Path(output_csv)
    return str(out.with_name(f"{out.stem}_natural.csv"))


def read_natural_csv(path: str) -> list[tuple[str, list[str]]]:
    """(ID, phrases) rows of a format-A file."""
    if not Path(path).is_file():
        raise UserError(f"--from_natural_csv {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        lower = [h.casefold() for h in header]
        if "id" not in lower or "concepts" not in lower:
            raise UserError(f"{path} needs the columns ID,Concepts; it has: {', '.join(header) or 'none'}")
        id_col, concepts_col = lower.index("id"), lower.index("concepts")
        rows = []
        for row in reader:
            if not row:
                continue
            # An unquoted comma inside a name ("Foramen Ovale, Patent") splits the last column: rejoin it.
            field = ",".join(row[concepts_col:]) if concepts_col == len(header) - 1 else row[concepts_col]
            rows.append((row[id_col], [p for p in field.split(";") if p.strip()]))
        return rows


def map_rows(rows: list[tuple[str, list[str]]], mapper: CuiMapper) -> tuple[list[list[str]], Counter]:
    """Format-B rows (ID, 'C1;C2') and a count of the phrases no CUI matched."""
    unmapped: Counter = Counter()
    out = []
    for image_id, phrases in rows:
        cuis, missed = mapper.map_phrases(phrases, limit=common.MAX_CONCEPTS)
        unmapped.update(missed)
        out.append([image_id, ";".join(cuis)])
    return out, unmapped


def write_cuis(rows: list[tuple[str, list[str]]], mapper: CuiMapper, output_csv: str) -> list[Path]:
    """Write format B and the unmapped-phrase report; log a short mapping summary."""
    cui_rows, unmapped = map_rows(rows, mapper)
    written = [write_csv_atomic(output_csv, ["ID", "CUIs"], cui_rows)]
    counts = [len(r[1].split(";")) if r[1] else 0 for r in cui_rows]
    summary = [f"CUIs: {sum(counts) / max(len(counts), 1):.2f} per image, {sum(1 for c in counts if c == 0)} images "
               f"without any, {len({c for r in cui_rows for c in r[1].split(';') if c})} distinct"]
    report = Path(output_csv).with_name(f"{Path(output_csv).stem}.unmapped.csv")
    if unmapped:
        written.append(unmapped_report(unmapped, report))
        top = ", ".join(f"{p!r} x{n}" for p, n in unmapped.most_common(10))
        summary.append(f"unmapped phrases: {sum(unmapped.values())} ({len(unmapped)} distinct); most frequent: {top}")
    else:
        report.unlink(missing_ok=True)
    log("\n".join(summary))
    return written


def write_concepts(args: argparse.Namespace, mapper: CuiMapper | None, ids: list[str], records: dict) -> list[Path]:
    """Format A from the raw answers, and format B when mapping is on."""
    rows = []
    for image_id in ids:
        record = records.get(image_id)
        rows.append((image_id, parse_answer(record.text if record and record.ok else "", mapper)))
    natural = [[i, ";".join(p)] for i, p in rows]
    written = [write_csv_atomic(natural_path(args.output_csv, args.output_csv_natural), ["ID", "Concepts"], natural)]
    if args.auto_map_cuis:
        written += write_cuis(rows, mapper, args.output_csv)
    return written


def remap_natural(args: argparse.Namespace) -> int:
    """--from_natural_csv: format A -> format B without a model."""
    if not args.auto_map_cuis:
        raise UserError("--from_natural_csv only maps to CUIs; drop --no-auto_map_cuis")
    start = time.perf_counter()
    mapper = common.load_mapper(args.cui_mapping_file)
    rows = read_natural_csv(args.from_natural_csv)
    written = write_cuis(rows, mapper, args.output_csv)
    accepted = common.check_submission("concepts", args.output_csv, [i for i, _ in rows])
    log(f"images: {len(rows)}\ntime: {time.perf_counter() - start:.1f} s\n" + "\n".join(f"wrote: {p}" for p in written))
    return 0 if accepted else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_natural_csv:
        return remap_natural(args)
    # The mapping file is read before the model loads, so a bad file fails in a second, not after hours.
    mapper = common.load_mapper(args.cui_mapping_file) if args.auto_map_cuis or Path(args.cui_mapping_file).is_file() \
        else None
    cfg = common.config_from_args(args, task="concepts",
                                  other_outputs=(natural_path(args.output_csv, args.output_csv_natural),))
    return common.run(cfg, lambda ids, records: write_concepts(args, mapper, ids, records))


if __name__ == "__main__":
    sys.exit(run_cli(main))
