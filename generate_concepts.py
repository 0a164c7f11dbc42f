"""Concept detection: a folder of medical images -> concept phrases (format A) and UMLS CUIs (format B).

    python generate_concepts.py --image_dir /data/test/images --output_csv results/concepts.csv \\
        --output_csv_natural results/concepts_natural.csv --cui_mapping_file data/cui_names.csv
    # a new mapping file later, no GPU needed:
    python generate_concepts.py --from_natural_csv results/concepts_natural.csv \\
        --output_csv results/concepts_v2.csv --cui_mapping_file cui_mapping_2025.csv

With --method knn|probe|fused the CUIs come from (or are fused with) the vision tower's embedding of
each image, scored against a concept index (concept_index.py fit/tune):

    python generate_concepts.py --image_dir /data/test/images --output_csv results/concepts.csv \\
        --method fused --concept_index index/ --concept_settings index/settings.json
    # new settings later, no GPU needed: the generated phrases + the embeddings the run kept
    python generate_concepts.py --from_natural_csv results/concepts_natural.csv --method fused \\
        --concept_index index/ --concept_settings index/settings_v2.json \\
        --embeddings results/concepts.embeddings.npz --output_csv results/concepts_v2.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
from jjvmed.cui_mapper import load_mapper
from jjvmed.errors import UserError, run_cli
from jjvmed.fusion import METHODS as VISION_METHODS
from jjvmed.prompts import parse_answer
from jjvmed.sources import AnswersFileSource, EmbedSource, GenerateSource, GenerateThenEmbed
from jjvmed.writers import ConceptWriter, VisionMethod, natural_path, split_natural

DEFAULT_MAPPING = Path(__file__).resolve().parent / "data" / "cui_names.csv"
METHODS = ("generate", *VISION_METHODS)
VISION_FLAGS = ("concept_index", "concept_settings", "embeddings")
# What --method knn / probe (CUIs from image vectors) and --from_natural_csv (format A read back) do not use,
# besides common.GENERATION_ONLY: refused when given, as every run that generates no text refuses them.
VECTORS_REFUSE = (*common.GENERATION_ONLY, "cui_mapping_file")
NO_MODEL_REFUSES = (*common.GENERATION_ONLY, "base_model_path", "batch_size", "num_workers", "dtype",
                    "resume_from_checkpoint", "overwrite")


def build_parser() -> common.Parser:
    parser = common.Parser(
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
        check_model_matches(args.base_model_path, index, settings)
    return VisionMethod(args.method, index, settings, args.device)


def embeddings_path(args: argparse.Namespace) -> Path:
    from jjvmed.embeddings import default_embeddings_path

    return Path(args.embeddings) if args.embeddings else default_embeddings_path(args.output_csv)


def embed_options(args: argparse.Namespace, vision: VisionMethod):
    """How the run's images are embedded: with every encoder the settings use, pooled as the index's training
    images were (the vectors the file holds of unchanged images are reused; --overwrite embeds them all)."""
    from jjvmed.index import embed_options_for

    if args.resume_from_checkpoint not in (None, "auto") and args.method != "fused":
        raise UserError(f"--method {args.method} resumes with --resume_from_checkpoint auto (it writes no journal)")
    # knn / probe: --batch_size is the embedding's; fused: the generation's
    batch_size = args.batch_size if args.method != "fused" else None
    return embed_options_for(vision.index, vision.settings, base_model_path=args.base_model_path, device=args.device,
                             dtype=args.dtype, num_workers=args.num_workers, overwrite=args.overwrite,
                             batch_size=batch_size)


def from_natural(args: argparse.Namespace, cfg: common.RunConfig, vision: VisionMethod | None) -> tuple:
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
    if cfg.shard is not None or cfg.merge:
        raise UserError("--from_natural_csv reads one file: no shards, and one process (no torchrun or accelerate)")
    if not Path(args.from_natural_csv).is_file():
        raise UserError(f"--from_natural_csv {args.from_natural_csv} does not exist")
    source = AnswersFileSource(args.from_natural_csv, "Concepts", args.embeddings if vision else None, args.image_dir)
    return source, ConceptWriter(args.output_csv, None, load_mapper(args.cui_mapping_file), split_natural, vision)


def check_one_process(args: argparse.Namespace, cfg: common.RunConfig) -> None:
    """--method knn|probe: no shards and no launcher, refused before anything is read or loaded."""
    if cfg.shard is not None or cfg.merge:
        raise UserError(f"--method {args.method} runs as one process (no --num_shards, no torchrun or accelerate): one "
                        "vision-tower pass over the images is quick")


def from_vision(args: argparse.Namespace, vision: VisionMethod) -> tuple:
    """--method knn|probe: one vision-tower pass over the run's images (no text), format B."""
    if not args.image_dir:
        raise UserError("--image_dir is required")
    return EmbedSource(embeddings_path(args), embed_options(args, vision)), ConceptWriter(args.output_csv,
                                                                                       vision=vision)


def from_generation(args: argparse.Namespace, vision: VisionMethod | None) -> tuple:
    """--method generate (or fused): the model's text -> format A, and format B from its CUIs (fused with the
    image vectors' for --method fused)."""
    if vision and not args.auto_map_cuis:
        raise UserError("--method fused fuses the CUIs of the generated text: drop --no-auto_map_cuis")
    mapper = load_mapper(args.cui_mapping_file) if args.auto_map_cuis or Path(args.cui_mapping_file).is_file() \
        else None
    source = GenerateSource(common.generation_from_args(args, task="concepts"))
    if vision:
        source = GenerateThenEmbed(source, EmbedSource(embeddings_path(args), embed_options(args, vision)))
    writer = ConceptWriter(args.output_csv if args.auto_map_cuis else None,
                           natural_path(args.output_csv, args.output_csv_natural), mapper,
                           lambda text: parse_answer(text, mapper), vision)
    return source, writer


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.zip and not args.auto_map_cuis:
        raise UserError("--zip packs format B, which --no-auto_map_cuis does not write: drop one of them")
    if args.from_natural_csv:  # no model: --device stays for fused, where the kNN search and the probe run
        common.refuse_generation_options(parser, NO_MODEL_REFUSES + (("device",) if args.method != "fused" else ()),
                                         "--from_natural_csv")
    elif args.method in ("knn", "probe"):
        if args.output_csv_natural or not args.auto_map_cuis:
            raise UserError(f"--method {args.method} writes format B only (no text, so no format A): drop "
                            "--output_csv_natural / --no-auto_map_cuis")
        common.refuse_generation_options(parser, VECTORS_REFUSE, f"--method {args.method}")
    cfg = common.config_from_args(args, task="concepts")
    if args.method in ("knn", "probe") and not args.from_natural_csv:
        check_one_process(args, cfg)
    # The index, settings and mapping file are read before the model loads: a bad file fails in seconds.
    vision = load_vision_method(args)
    if args.from_natural_csv:
        source, writer = from_natural(args, cfg, vision)
    elif vision and vision.name != "fused":
        source, writer = from_vision(args, vision)
    else:
        source, writer = from_generation(args, vision)
    return common.run(cfg, source, writer)


if __name__ == "__main__":
    sys.exit(run_cli(main))
