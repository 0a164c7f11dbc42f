"""Caption generation: a folder of medical images -> `ID,Caption` CSV for ImageCLEFmedical Caption.

    python generate_captions.py --image_dir /data/test/images --output_csv results/captions.csv
    # killed half-way? the same command plus:  --resume_from_checkpoint auto

Three methods (README: Captions from the nearest training images, and the best of several). With a caption
index (concept_index.py fit --train_captions):

    # the caption of the nearest training image: no text generation
    python generate_captions.py --method knn --concept_index index/ --embeddings emb/test.npz \\
        --output_csv results/captions_knn.csv --ids_csv ids.csv --zip results/captions_knn.zip
    # the 3 nearest training captions in the prompt, then the model writes the caption
    python generate_captions.py --method rag --concept_index index/ --neighbours 3 \\
        --image_dir /data/test/images --output_csv results/captions_rag.csv
    # best of 4 beams, the one an image-text model finds closest to its image
    python generate_captions.py --image_dir /data/test/images --output_csv results/captions_best.csv \\
        --candidates 4 --rerank_model /models/BiomedCLIP
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import common
from jjvmed.errors import UserError, run_cli
from jjvmed.prompts import rag_template
from jjvmed.sources import GenerateSource, NearestCaptionSource
from jjvmed.writers import CaptionWriter

METHODS = ("generate", "knn", "rag")
RETRIEVAL_FLAGS = ("concept_index", "neighbours", "embeddings")
# Besides common.GENERATION_ONLY, what only generated captions have: refused with --method knn, which
# generates no text and keeps no journal (--overwrite stays: it embeds every image again).
KNN_REFUSES = (*common.GENERATION_ONLY, "candidates", "rerank_model", "num_shards", "shard_index", "merge_shards")

def build_parser() -> common.Parser:
    parser = common.Parser(
        description="Generate captions for every image in a folder with LLaVA-LLaMA-3-8B + the JJ-VMed LoRA "
        "adapter, and write an ImageCLEFmedical Caption submission (ID,Caption). Or copy the caption of the "
        "nearest training image (--method knn), give the model the nearest training captions as context "
        "(--method rag), and keep the best of several candidates by image-text similarity (--candidates).",
    )
    common.add_common_arguments(parser, task="caption")
    retrieval = parser.add_argument_group("captions from the nearest training images (README: Captions from the "
                                          "nearest training images, and the best of several)")
    retrieval.add_argument("--method", choices=METHODS, default="generate",
                           help="generate: the model writes each caption. knn: the caption of the nearest training "
                           "image (or the consensus of the --neighbours nearest), no text generation. rag: the "
                           "--neighbours nearest training captions go into the prompt as context, marked as "
                           "describing similar images, then the model writes the caption (default: %(default)s)")
    retrieval.add_argument("--concept_index", default=None, metavar="DIR",
                           help="folder written by concept_index.py fit with --train_captions (knn, rag)")
    retrieval.add_argument("--neighbours", type=int, default=None, metavar="K",
                           help="nearest training images whose captions are used: knn takes the consensus of K "
                           "(1: the nearest one's), rag puts K into the prompt (default: 1 for knn, 3 for rag)")
    retrieval.add_argument("--embeddings", default=None, metavar="PATH",
                           help="the images' embeddings with the index's encoders: the vectors it holds of images "
                           "whose files are unchanged are reused, the others embedded into it (default: beside "
                           "--output_csv, <its stem>.embeddings.npz); with shards it is made beforehand and only read. "
                           "knn without --image_dir writes a row for every image of this file")
    best = parser.add_argument_group("best of several candidates")
    best.add_argument("--candidates", type=int, default=1, metavar="N",
                      help="captions generated per image: the N best beams of a beam search of N beams "
                      "(deterministic; a larger num_beams in --generation_kwargs widens it, a smaller one is refused; "
                      "with \"do_sample\": true there, N samples instead). The journal keeps all of them "
                      "(default: %(default)s)")
    best.add_argument("--rerank_model", default=None, metavar="DIR|ID",
                      help="image-text model that scores each candidate against its image, the best kept: an "
                      "open_clip model (BiomedCLIP) or a Hugging Face CLIP / SigLIP one (MedSigLIP), a folder or hub "
                      "ID, optionally prefixed open_clip: or hf:. The scores go into the journal, so another "
                      "reranker later needs no generation (without it: the first candidate)")
    return parser


def check_method_options(args: argparse.Namespace, parser: common.Parser) -> None:
    """Options that do not go with --method, and numbers out of range: one line, before anything loads."""
    common.check_positive(candidates=args.candidates, neighbours=args.neighbours)
    if args.method == "generate":
        given = [f"--{flag}" for flag in RETRIEVAL_FLAGS if getattr(args, flag) is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only with --method knn or rag")
    elif not args.concept_index:
        raise UserError(f"--method {args.method} needs --concept_index DIR (concept_index.py fit --train_captions)")
    if args.method == "knn":
        common.refuse_generation_options(parser, KNN_REFUSES, "--method knn")
        if args.resume_from_checkpoint not in (None, "auto"):
            raise UserError("--resume_from_checkpoint PATH: --method knn keeps no journal (its embeddings are reused "
                            "by themselves); give auto or nothing")
        if not args.image_dir and not args.embeddings:
            raise UserError("--method knn needs --image_dir (to embed the images) or --embeddings (vectors from "
                            "concept_index.py embed)")
    elif args.method == "rag" and not args.image_dir:
        raise UserError("--method rag needs --image_dir: the model sees each image")
    if args.method == "rag" and args.prompt:
        rag_template("vicuna", args.language, args.prompt)  # says so if the prompt has no place for the captions
    if args.rerank_model and args.candidates < 2:
        raise UserError("--rerank_model chooses among candidates: add --candidates N (2 or more)")


def load_retrieval(args: argparse.Namespace, cfg: common.RunConfig):
    """The caption index and how the run's images are embedded for it, read and checked before any model loads."""
    from jjvmed.embeddings import default_embeddings_path
    from jjvmed.index import embed_options_for, load_index
    from jjvmed.model import resolve_device
    from jjvmed.retrieval import DEFAULT_NEIGHBOURS, Retrieval, check_caption_index

    index = load_index(args.concept_index)
    check_caption_index(index, args.concept_index)
    embeddings = Path(args.embeddings) if args.embeddings else default_embeddings_path(args.output_csv)
    # One process writes an embeddings file: shards (a launcher's or a job array's) and the merge only read it.
    sharded = cfg.shard is not None or cfg.merge
    if args.method == "rag" and sharded and not cfg.merge and not embeddings.exists():
        raise UserError("--method rag with shards: embed the images once first (concept_index.py embed --image_dir "
                        "... --encoder ... as the index), and give that file with --embeddings")
    batch_size = args.batch_size if args.method == "knn" else None  # rag: --batch_size is the generation's
    options = embed_options_for(index, None, base_model_path=args.base_model_path, batch_size=batch_size,
                                device=args.device, dtype=args.dtype, num_workers=args.num_workers,
                                overwrite=args.overwrite)
    neighbours = args.neighbours or DEFAULT_NEIGHBOURS[args.method]
    if neighbours > len(index.ids):
        raise UserError(f"--neighbours {neighbours}: the index has {len(index.ids)} training images")
    return Retrieval(index, neighbours, embeddings, options, resolve_device(args.device),
                     read_only=sharded or not args.image_dir)


def with_candidates(gen_kwargs: dict, candidates: int, asked: dict) -> dict:
    """generate() settings for N candidates per image: the N best beams of a beam search of N beams (or of the
    num_beams asked for, if more), or N samples; settings that generate() would refuse, and a num_beams asked
    for that is too small for N beams, are one line now, before the model loads. `asked`: the settings
    --generation_kwargs gave itself."""
    if "num_return_sequences" in gen_kwargs:
        raise UserError("--generation_kwargs num_return_sequences: use --candidates N")
    if candidates == 1:
        return gen_kwargs
    if not gen_kwargs.get("do_sample") and asked.get("num_beams", candidates) < candidates:
        raise UserError(f"--generation_kwargs num_beams {asked['num_beams']} with --candidates {candidates}: the "
                        f"{candidates} best beams need a beam search of at least {candidates} beams; give num_beams "
                        f"{candidates} or more, or leave it out")
    beams = {} if gen_kwargs.get("do_sample") else {"num_beams": max(candidates, gen_kwargs.get("num_beams", 1))}
    kwargs = {**gen_kwargs, **beams, "num_return_sequences": candidates}
    common.check_generation_settings(kwargs, f"--candidates {candidates} with these generate() settings")
    return kwargs


def generation_source(args: argparse.Namespace, retrieval) -> GenerateSource:
    """--method generate or rag: the model writes the captions (N per image with --candidates)."""
    from jjvmed.prompts import resolve_template

    generation = common.generation_from_args(args, task="caption")
    asked = common.user_generation_kwargs(args.generation_kwargs)
    generation = replace(generation, gen_kwargs=with_candidates(generation.gen_kwargs, args.candidates, asked),
                         rerank_model=args.rerank_model)
    if retrieval is not None:
        template = resolve_template(args.prompt_template, generation.model.adapter)
        generation = replace(generation, prompt=rag_template(template, args.language, args.prompt),
                             retrieval=retrieval)
    return GenerateSource(generation)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_method_options(args, parser)
    cfg = common.config_from_args(args, task="caption")
    if args.method == "knn" and cfg.shard is not None:  # a launcher's processes (knn refuses --num_shards itself)
        raise UserError("--method knn runs as one process, not under torchrun or accelerate: one encoder pass over "
                        "the images is quick")
    retrieval = load_retrieval(args, cfg) if args.method != "generate" else None
    if args.method == "knn":
        source = NearestCaptionSource(retrieval, reads_images=bool(args.image_dir))
    else:
        source = generation_source(args, retrieval)
    return common.run(cfg, source, CaptionWriter(cfg.output_csv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
