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
import errors
import files
from cui_mapper import CuiMapper, parse_answer, unmapped_report

DEFAULT_MAPPING = Path(__file__).resolve().parent / "data" / "cui_names.csv"
MAX_CONCEPTS = 100  # the evaluator rejects a row with more


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Detect medical concepts in every image of a folder with LLaVA-LLaMA-3-8B + the JJ-VMed LoRA "
        "adapter: natural-language concepts (format A, ID,Concepts) and UMLS CUIs for an ImageCLEFmedical "
        "concept-detection submission (format B, ID,CUIs).",
    )
    common.add_common_arguments(parser, task="concepts", max_new_tokens=150)
    group = parser.add_argument_group("concepts")
    group.add_argument("--output_csv_natural", default="results/concepts_natural.csv",
                       help="format A: the concept phrases the model named, joined by ';' (default: %(default)s)")
    group.add_argument("--cui_mapping_file", default=str(DEFAULT_MAPPING),
                       help="CSV with a CUI column and a name column (Name, Canonical name, Preferred_name or "
                       "STR), optionally Synonyms (';'-separated) (default: the shipped data/cui_names.csv)")
    group.add_argument("--auto_map_cuis", action=argparse.BooleanOptionalAction, default=True,
                       help="map the phrases to CUIs and write --output_csv (format B); --no-auto_map_cuis writes "
                       "format A only (default: on)")
    group.add_argument("--from_natural_csv", default=None, metavar="PATH",
                       help="skip the model: re-map an existing format-A file to format B with --cui_mapping_file")
    return parser


def load_mapper(path: str) -> CuiMapper:
    try:
        return CuiMapper.from_csv(path)
    except ValueError as e:
        raise errors.UserError(str(e)) from None


def read_natural_csv(path: str) -> list[tuple[str, list[str]]]:
    """(ID, phrases) rows of a format-A file."""
    if not Path(path).is_file():
        raise errors.UserError(f"--from_natural_csv {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        lower = [h.casefold() for h in header]
        if "id" not in lower or "concepts" not in lower:
            raise errors.UserError(f"{path} needs the columns ID,Concepts; it has: {', '.join(header) or 'none'}")
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
        cuis, missed = mapper.map_phrases(phrases, limit=MAX_CONCEPTS)
        unmapped.update(missed)
        out.append([image_id, ";".join(cuis)])
    return out, unmapped


def write_cuis(rows: list[tuple[str, list[str]]], mapper: CuiMapper, output_csv: str) -> list[Path]:
    """Write format B and the unmapped-phrase report; log a short mapping summary."""
    cui_rows, unmapped = map_rows(rows, mapper)
    written = [files.write_csv_atomic(output_csv, ["ID", "CUIs"], cui_rows)]
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
    errors.log("\n".join(summary))
    return written


def remap_natural(args: argparse.Namespace) -> int:
    """--from_natural_csv: format A -> format B without a model."""
    if not args.auto_map_cuis:
        raise errors.UserError("--from_natural_csv only maps to CUIs; drop --no-auto_map_cuis")
    start = time.perf_counter()
    mapper = load_mapper(args.cui_mapping_file)
    rows = read_natural_csv(args.from_natural_csv)
    written = write_cuis(rows, mapper, args.output_csv)
    accepted = common.check_submission("concepts", args.output_csv, [i for i, _ in rows])
    errors.log(f"images: {len(rows)}\ntime: {time.perf_counter() - start:.1f} s\n"
               + "\n".join(f"wrote: {p}" for p in written))
    return 0 if accepted else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_natural_csv:
        return remap_natural(args)
    # The mapping file is read before the model loads, so a bad file fails in a second, not after hours.
    mapper = load_mapper(args.cui_mapping_file) if args.auto_map_cuis or Path(args.cui_mapping_file).is_file() \
        else None
    cfg = common.build_config(args, task="concepts")
    result = common.merge_shards(cfg) if args.merge_shards else common.run_generation(cfg)
    outputs: list[Path] = []
    accepted = True
    if result.writer and not result.interrupted:
        rows = []
        for image_id in result.ids:
            record = result.records.get(image_id) or {}
            text = "" if record.get("error") else record.get("text", "")
            rows.append((image_id, parse_answer(text, mapper)))
        natural = [[i, ";".join(p)] for i, p in rows]
        outputs.append(files.write_csv_atomic(args.output_csv_natural, ["ID", "Concepts"], natural))
        if args.auto_map_cuis:
            outputs += write_cuis(rows, mapper, args.output_csv)
            accepted = common.check_submission("concepts", args.output_csv, result.ids)
    return common.finish_run(result, args.output_csv, outputs, rejected=not accepted)


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
