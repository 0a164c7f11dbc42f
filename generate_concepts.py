"""Concept detection: a folder of medical images -> concept phrases (format A) and UMLS CUIs (format B).

    python generate_concepts.py --image_dir /data/test/images --output_csv results/concepts.csv \\
        --output_csv_natural results/concepts_natural.csv --cui_mapping_file data/cui_names.csv
    # a new mapping file later, no GPU needed:
    python generate_concepts.py --from_natural_csv results/concepts_natural.csv \\
        --output_csv results/concepts_v2.csv --cui_mapping_file cui_mapping_2025.csv

With --method knn|probe|fused the CUIs come from (or are fused with) the vision tower's embedding of
each image, scored against a concept index (concept_index.py fit/tune; library: jjvmed/embeddings.py, index.py, fusion.py, tuning.py):

    python generate_concepts.py --image_dir /data/test/images --output_csv results/concepts.csv \\
        --method fused --concept_index index/ --concept_settings index/settings.json
    # new settings later, no GPU needed: the generated phrases + the embeddings the run kept
    python generate_concepts.py --from_natural_csv results/concepts_natural.csv --method fused \\
        --concept_index index/ --concept_settings index/settings_v2.json \\
        --embeddings results/concepts.embeddings.npz --output_csv results/concepts_v2.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import common
from jjvmed.cui_mapper import CuiMapper, load_mapper, unmapped_report
from jjvmed.errors import UserError, log, run_cli
from jjvmed.files import check_writable, lock_exclusive, write_csv_atomic
from jjvmed.prompts import parse_answer
from jjvmed.submission import MAX_CONCEPTS, check_zip_path, in_id_list_order, write_zip

DEFAULT_MAPPING = Path(__file__).resolve().parent / "data" / "cui_names.csv"
METHODS = ("generate", "knn", "probe", "fused")
VISION_FLAGS = ("concept_index", "concept_settings", "embeddings")


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
                       help="skip the model: re-map an existing format-A file to format B with --cui_mapping_file "
                       "(with --method fused and --embeddings: fuse it again, e.g. with new settings)")

    vision = parser.add_argument_group("concepts from the vision tower (README: Concepts from the vision tower)")
    vision.add_argument("--method", choices=METHODS, default="generate",
                        help="generate: CUIs of the generated text. knn / probe: CUIs from each image's vision-tower "
                        "embedding (nearest training images / linear probe), no text generation, so format B only "
                        "(no format A). fused: the generated text (format A) and format B from its CUIs fused with "
                        "the kNN/probe scores as --concept_settings says (default: %(default)s)")
    vision.add_argument("--concept_index", default=None, metavar="DIR",
                        help="folder written by concept_index.py fit (knn, probe, fused)")
    vision.add_argument("--concept_settings", default=None, metavar="PATH",
                        help="settings JSON written by concept_index.py tune (knn, probe, fused)")
    vision.add_argument("--embeddings", default=None, metavar="PATH",
                        help="the images' embeddings: a run writes them here, resumably (default: beside "
                        "--output_csv, <its stem>.embeddings.npz); with --from_natural_csv they are read")
    return parser


@dataclass(frozen=True)
class VisionMethod:
    """A concept index and the tuned settings of one method on it (knn, probe or fused)."""
    name: str
    index: object  # jjvmed.index.ConceptIndex
    settings: dict


def load_vision_method(args: argparse.Namespace) -> VisionMethod | None:
    """The index and settings of --method, read and checked before any model loads; None for generate."""
    if args.method == "generate":
        given = [f"--{flag}" for flag in VISION_FLAGS if getattr(args, flag)]
        if given:
            raise UserError(f"{', '.join(given)}: only with --method knn, probe or fused")
        return None
    if not args.concept_index or not args.concept_settings:
        raise UserError(f"--method {args.method} needs --concept_index DIR and --concept_settings PATH (written by "
                        "concept_index.py fit and tune)")
    from jjvmed.fusion import check_model_matches, load_settings
    from jjvmed.index import load_index

    index = load_index(args.concept_index)
    settings = load_settings(args.concept_settings, args.method, index)
    if not args.from_natural_csv:
        check_model_matches(args.base_model_path, index)
    return VisionMethod(args.method, index, settings)


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
        cuis, missed = mapper.map_phrases(phrases, limit=MAX_CONCEPTS)
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


def remap_natural(args: argparse.Namespace, vision: VisionMethod | None) -> int:
    """--from_natural_csv: format A -> format B without a model; with --method fused, fused again with the
    embeddings a run kept."""
    if not args.auto_map_cuis:
        raise UserError("--from_natural_csv only maps to CUIs; drop --no-auto_map_cuis")
    if vision and vision.name != "fused":
        raise UserError(f"--from_natural_csv goes with --method generate or fused; --method {vision.name} needs no "
                        "generated text (concept_index.py predict scores an embeddings file)")
    if vision and not args.embeddings:
        raise UserError("--from_natural_csv --method fused needs --embeddings PATH (the run's "
                        "<output stem>.embeddings.npz)")
    if args.zip:
        check_zip_path(args.zip)
    start = time.perf_counter()
    mapper = load_mapper(args.cui_mapping_file)
    rows = read_natural_csv(args.from_natural_csv)
    if args.ids_csv:
        rows, _ = in_id_list_order(rows, args.ids_csv, f"row in {args.from_natural_csv}")
    rows = rows[: args.limit] if args.limit else rows
    if vision:
        from jjvmed.embeddings import load_embeddings

        emb = load_embeddings(args.embeddings)
        known = set(emb.ids) | set(emb.failed)
        missing = [i for i, _ in rows if i not in known]
        if missing:
            raise UserError(f"{len(missing)} IDs of {args.from_natural_csv} are not in {args.embeddings} (first: "
                            f"{', '.join(missing[:3])}): the embeddings of another run?")
        written = write_fused(rows, emb, vision, mapper, args.output_csv, args.device)
    else:
        written = write_cuis(rows, mapper, args.output_csv)
    accepted = common.check_submission("concepts", args.output_csv, [i for i, _ in rows])
    if accepted and args.zip:
        written.append(write_zip(args.output_csv, args.zip))
    log(f"images: {len(rows)}\ntime: {time.perf_counter() - start:.1f} s\n" + "\n".join(f"wrote: {p}" for p in written))
    return 0 if accepted else 1


# ---------------------------------------------------------------------------------------------
# Concepts from the vision tower
# ---------------------------------------------------------------------------------------------


def embeddings_path(args: argparse.Namespace) -> Path:
    from jjvmed.embeddings import default_embeddings_path

    return Path(args.embeddings) if args.embeddings else default_embeddings_path(args.output_csv)


def embed_options(args: argparse.Namespace, index):
    """How the run's images are embedded: like the index's training images (pooling), resumable like the run."""
    from jjvmed.embeddings import EmbedOptions

    if args.resume_from_checkpoint not in (None, "auto") and args.method != "fused":
        raise UserError(f"--method {args.method} resumes with --resume_from_checkpoint auto (it writes no journal)")
    # A fused run resumed from a journal PATH resumes its embeddings too.
    return EmbedOptions(args.base_model_path, index.meta.get("embeddings", {}).get("pooling", "mean"),
                           device=args.device, dtype=args.dtype, num_workers=args.num_workers,
                           resume=args.resume_from_checkpoint is not None, overwrite=args.overwrite)


def write_fused(rows: list[tuple[str, list[str]]], emb, vision: VisionMethod, mapper: CuiMapper, output_csv: str,
                device: str) -> list[Path]:
    """Format B: the CUIs the phrases map to, fused with the kNN/probe scores of the embeddings, in the rows' order.
    The run and --from_natural_csv both come here, so fusing again gives the same file."""
    from jjvmed.fusion import predict_concepts

    cui_rows, unmapped = map_rows(rows, mapper)
    generated = {i: cuis.split(";") if cuis else [] for i, cuis in cui_rows}
    fused = predict_concepts(vision.index, vision.settings, emb, generated, device=device)
    written = [write_csv_atomic(output_csv, ["ID", "CUIs"], ([i, ";".join(fused.get(i, []))] for i, _ in rows))]
    report = Path(output_csv).with_name(f"{Path(output_csv).stem}.unmapped.csv")
    if unmapped:
        written.append(unmapped_report(unmapped, report))
    else:
        report.unlink(missing_ok=True)
    counts = [len(fused.get(i, [])) for i, _ in rows]
    changed = sum(1 for i, _ in rows if fused.get(i, []) != generated[i])
    log(f"fused ({vision.settings['source']}): {sum(counts) / max(len(counts), 1):.2f} CUIs per image, "
        f"{counts.count(0)} images without any, {changed} differ from the generated CUIs")
    return written


class LoadOnce:
    """The generate run's model, loaded when the run first needs it and kept, so the embedding pass reuses it:
    one model load for both. It unpacks like model.load_model's (model, processor, device)."""

    def __init__(self, spec):
        self.spec = spec
        self.loaded = None

    def __iter__(self):
        if self.loaded is None:
            from jjvmed.model import load_model

            self.loaded = load_model(self.spec)
        return iter(self.loaded)

    def encoder(self):
        """The loaded model's vision tower, or None if nothing was generated (then embedding loads the tower alone)."""
        from jjvmed.encoders import vision_encoder_from

        return vision_encoder_from(*self.loaded[:2]) if self.loaded is not None else None


def write_fused_run(args: argparse.Namespace, cfg: common.RunConfig, mapper: CuiMapper, vision: VisionMethod,
                    model: LoadOnce | None, ids: list[str], records: dict) -> list[Path]:
    """--method fused, after generation: format A from the text, the embeddings, format B fused."""
    from jjvmed.embeddings import embed_images

    rows = [(i, parse_answer(records[i].text if i in records and records[i].ok else "", mapper)) for i in ids]
    natural = natural_path(args.output_csv, args.output_csv_natural)
    written = [write_csv_atomic(natural, ["ID", "Concepts"], ([i, ";".join(p)] for i, p in rows))]
    paths = dict(common.select_images(cfg.image_dir, cfg.ids_csv, cfg.limit).items)
    out = embeddings_path(args)
    emb = embed_images([(i, paths[i]) for i in ids], out, embed_options(args, vision.index),
                          model.encoder() if model else None)
    written.append(out)
    return write_fused(rows, emb, vision, mapper, args.output_csv, args.device) + written


def vision_run(args: argparse.Namespace, vision: VisionMethod) -> int:
    """--method knn|probe: one vision-tower pass over the run's images (no text), format B, the 2026 check, the zip."""
    from jjvmed.embeddings import embed_images
    from jjvmed.fusion import predict_concepts

    if args.output_csv_natural or not args.auto_map_cuis:
        raise UserError(f"--method {args.method} writes format B only (no text, so no format A): drop "
                        "--output_csv_natural / --no-auto_map_cuis")
    if args.num_shards is not None or args.merge_shards:
        raise UserError(f"--method {args.method} needs no shards: one vision-tower pass over the images is quick")
    if args.zip:
        check_zip_path(args.zip)
    cfg = common.config_from_args(args, task="concepts")
    out = embeddings_path(args)
    for path in (cfg.output_csv, out, cfg.zip_path):
        if path:
            check_writable(path, "output")
    options = embed_options(args, vision.index)
    selection = common.select_images(cfg.image_dir, cfg.ids_csv, cfg.limit)
    start = time.perf_counter()
    with lock_exclusive(Path(cfg.output_csv)):
        emb = embed_images(selection.items, out, options)
        predictions = predict_concepts(vision.index, vision.settings, emb, device=args.device)
        written = [write_csv_atomic(cfg.output_csv, ["ID", "CUIs"],
                                    ([i, ";".join(predictions.get(i, []))] for i in selection.ids)), out]
        accepted = common.check_submission("concepts", cfg.output_csv, selection.ids)
        if accepted and cfg.zip_path:


            written.append(write_zip(cfg.output_csv, cfg.zip_path))
    counts = [len(predictions.get(i, [])) for i in selection.ids]
    lines = [f"images: {len(selection.ids)} (embedded: {len(emb.ids)}, failed: {len(emb.failed)})",
             f"CUIs ({args.method}): {sum(counts) / max(len(counts), 1):.2f} per image, {counts.count(0)} images "
             "without any", f"time: {time.perf_counter() - start:.1f} s"]
    for why, names in selection.skipped.items():
        lines.append(f"skipped, {why}: {len(names)}")
    log("\n".join(lines + [f"wrote: {p}" for p in written]))
    return 0 if accepted else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The index, settings and mapping file are read before the model loads: a bad file fails in seconds.
    vision = load_vision_method(args)
    if args.from_natural_csv:
        return remap_natural(args, vision)
    if vision and vision.name != "fused":
        return vision_run(args, vision)
    if vision and not args.auto_map_cuis:
        raise UserError("--method fused fuses the CUIs of the generated text: drop --no-auto_map_cuis")
    mapper = load_mapper(args.cui_mapping_file) if args.auto_map_cuis or Path(args.cui_mapping_file).is_file() \
        else None
    natural = natural_path(args.output_csv, args.output_csv_natural)
    if not vision:
        cfg = common.config_from_args(args, task="concepts", other_outputs=(natural,))
        return common.run(cfg, lambda ids, records: write_concepts(args, mapper, ids, records))
    cfg = common.config_from_args(args, task="concepts", other_outputs=(natural, str(embeddings_path(args))))
    from jjvmed.embeddings import check_embeddings_target

    check_embeddings_target(embeddings_path(args), embed_options(args, vision.index))
    # Under a launcher each process loads its own model on its own device; the embedding pass, done by the
    # process that writes the CSVs, then loads the vision tower alone.
    model = LoadOnce(cfg.model) if cfg.shard is None else None
    return common.run(cfg, lambda ids, records: write_fused_run(args, cfg, mapper, vision, model, ids, records),
                      model_bundle=model)


if __name__ == "__main__":
    sys.exit(run_cli(main))
