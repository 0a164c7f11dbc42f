"""Concepts from the vision tower: embed images, fit the kNN index and probe, tune on validation, predict.

    python concept_index.py embed --image_dir /data/train/images --output emb/train.npz
    python concept_index.py embed --image_dir /data/valid/images --output emb/valid.npz
    python concept_index.py fit --train_embeddings emb/train.npz --train_concepts train_concepts.csv \\
        --output_dir index/
    python concept_index.py tune --index_dir index/ --valid_embeddings emb/valid.npz \\
        --valid_concepts valid_concepts.csv --valid_generated results/valid_concepts.csv --output index/settings.json
    python concept_index.py predict --index_dir index/ --settings index/settings.json --method knn \\
        --embeddings emb/test.npz --output_csv results/concepts_knn.csv

Only `embed` needs a GPU (one pass of the vision tower, no text generation); the rest runs on a CPU.
The library: jjvmed/encoders.py and embeddings.py (embed), index.py (fit), tuning.py (tune), fusion.py (predict).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jjvmed import errors, files
from jjvmed.model import DEFAULT_BASE_MODEL

METHODS = ("knn", "probe", "fused")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Concept detection from LLaVA's vision tower: image embeddings, nearest training images (kNN) "
        "and a linear probe, thresholds and fusion with the generated concepts tuned on the official F1.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{embed,fit,tune,predict}")

    embed = sub.add_parser("embed", help="one vision-tower pass over a folder of images -> one embeddings file",
                           description="Embed every image of a folder with the vision tower (the features LLaVA "
                           "feeds its projector, pooled and L2-normalised) into one .npz file. Resumable: chunks are "
                           "saved as they complete.")
    embed.add_argument("--image_dir", required=True, help="folder of images; the ID is the file name without "
                       "its extension")
    embed.add_argument("--output", required=True, help="embeddings file to write (.npz)")
    embed.add_argument("--limit", type=int, default=None, help="only the first N images (a quick trial)")
    embed.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL,
                       help="hub ID or folder of the LLaVA model; no adapter is needed, the LoRA does not touch "
                       "the vision tower (default: %(default)s)")
    embed.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                       help="mean of the patch tokens the projector gets, or the CLS token (default: %(default)s)")
    embed.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    embed.add_argument("--chunk_size", type=int, default=4096,
                       help="images per checkpoint chunk; a killed run redoes at most one (default: %(default)s)")
    embed.add_argument("--num_workers", type=int, default=None,
                       help="processes decoding images (default: 8, at most cores - 1, with a GPU; 0 on CPU)")
    embed.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                       help="auto: the first GPU if CUDA is present, else CPU (default: %(default)s)")
    embed.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                       help="auto: bfloat16 on GPUs that support it, float16 on older ones, float32 on CPU "
                       "(default: %(default)s)")
    embed.add_argument("--resume_from_checkpoint", choices=["auto"], default=None,
                       help="continue a killed run from the chunks beside --output (<output>.parts/)")
    embed.add_argument("--overwrite", action="store_true", help="discard finished chunks or file and start over")

    fit = sub.add_parser("fit", help="training embeddings + concepts -> kNN index and probe",
                         description="Index the training embeddings with their CUIs and train the probe "
                         "(multi-label BCE, minutes on a CPU for 80,000 images); writes index.npz, probe.safetensors "
                         "and probe.json.")
    fit.add_argument("--train_embeddings", required=True, help="embeddings of the training images (from embed)")
    fit.add_argument("--train_concepts", required=True, help="ID,CUIs CSV of the training images (CUIs joined by ;)")
    fit.add_argument("--output_dir", required=True, help="folder for the index and the probe")
    fit.add_argument("--probe_hidden", type=int, default=0,
                     help="units of one hidden layer; 0 trains a linear probe (default: %(default)s)")
    fit.add_argument("--probe_epochs", type=int, default=10,
                     help="passes over the training vectors at most; training stops earlier once a pass lowers the "
                     "mean training loss by less than --probe_tolerance of it; 0 fits no probe, kNN only "
                     "(default: %(default)s)")
    fit.add_argument("--probe_tolerance", type=float, default=0.02,
                     help="the relative drop in training loss below which training stops (default: %(default)s)")
    fit.add_argument("--probe_batch_size", type=int, default=2048, help="images per step (default: %(default)s)")
    fit.add_argument("--probe_learning_rate", type=float, default=3e-3,
                     help="AdamW learning rate (default: %(default)s)")
    fit.add_argument("--probe_weight_decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0, help="random seed of the probe (default: %(default)s)")
    fit.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                     help="where the probe trains (default: %(default)s)")

    tune = sub.add_parser("tune", help="choose k, thresholds and fusion on the validation split -> settings JSON",
                          description="Maximise the official primary F1 on the validation split over k, neighbour "
                          "weighting, probe/kNN blend, generated-concept weight, a global threshold, keeping the top "
                          "CUI, and per-CUI thresholds; print the F1 of each method alone and fused.")
    tune.add_argument("--index_dir", required=True, help="folder written by fit")
    tune.add_argument("--valid_embeddings", required=True, help="embeddings of the validation images (from embed)")
    tune.add_argument("--valid_concepts", required=True, help="ground truth ID,CUIs of the validation images")
    tune.add_argument("--valid_generated", default=None,
                      help="ID,CUIs from generate_concepts.py on the validation images, to tune the fusion with them")
    tune.add_argument("--valid_manual", default=None,
                      help="manual ground truth (valid_concepts_manual.csv): also report the secondary F1")
    tune.add_argument("--output", required=True, help="settings JSON to write")
    tune.add_argument("--per_cui_thresholds", action=argparse.BooleanOptionalAction, default=True,
                      help="tune a threshold per CUI with enough validation support, kept only if it raises the "
                      "F1 on held-out halves (default: on)")
    tune.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                      help="where the kNN search and the probe run (default: %(default)s)")

    predict = sub.add_parser("predict", help="embeddings (+ generated CUIs) -> ID,CUIs submission file",
                             description="Final CUIs per image with the tuned settings of one method.")
    predict.add_argument("--index_dir", required=True, help="folder written by fit")
    predict.add_argument("--settings", required=True, help="settings JSON written by tune")
    predict.add_argument("--method", choices=METHODS, default="fused",
                         help="knn, probe, or fused (the best on validation) (default: %(default)s)")
    predict.add_argument("--embeddings", required=True, help="embeddings of the images to label (from embed)")
    predict.add_argument("--generated", default=None,
                         help="ID,CUIs from generate_concepts.py on the same images (needed when the fused "
                         "settings use them)")
    predict.add_argument("--output_csv", required=True, help="ID,CUIs file to write")
    predict.add_argument("--ids_csv", default=None, metavar="PATH",
                         help="the expected IDs in the platform's order (the organisers' ID list or a ground-truth "
                         "file); rows follow it exactly")
    predict.add_argument("--zip", default=None, metavar="PATH",
                         help="also write the upload zip (only submission.csv inside) when the checks accept the file")
    predict.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                         help="where the kNN search and the probe run (default: %(default)s)")
    return parser


def run_embed(args: argparse.Namespace) -> int:
    from jjvmed.embeddings import EmbedOptions, embed_images
    from jjvmed.images import list_images

    if args.limit is not None and args.limit < 1:
        raise errors.UserError(f"--limit must be at least 1, got {args.limit}")
    if args.num_workers is not None and args.num_workers < 0:
        raise errors.UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    items = list_images(args.image_dir)[: args.limit]
    options = EmbedOptions(args.base_model_path, args.pooling, args.batch_size, args.chunk_size, args.device,
                              args.dtype, args.num_workers, resume=args.resume_from_checkpoint == "auto",
                              overwrite=args.overwrite)
    start = time.perf_counter()
    try:
        emb = embed_images(items, args.output, options)
    except KeyboardInterrupt:
        errors.log("interrupted: finished chunks are kept; rerun the same command with --resume_from_checkpoint auto")
        return 130
    errors.log(f"images: {len(items)} (embedded: {len(emb.ids)}, failed: {len(emb.failed)})\n"
               f"time: {time.perf_counter() - start:.1f} s\nwrote: {args.output}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from jjvmed.embeddings import load_embeddings
    from jjvmed.index import ProbeOptions, fit_index, read_cui_sets

    for name in ("probe_hidden", "probe_epochs"):
        if getattr(args, name) < 0:
            raise errors.UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.probe_batch_size < 1:
        raise errors.UserError(f"--probe_batch_size must be at least 1, got {args.probe_batch_size}")
    emb = load_embeddings(args.train_embeddings)
    concepts = read_cui_sets(args.train_concepts)
    if args.probe_tolerance < 0:
        raise errors.UserError(f"--probe_tolerance must be 0 or more, got {args.probe_tolerance}")
    options = ProbeOptions(args.probe_hidden, args.probe_epochs, args.probe_batch_size, args.probe_learning_rate,
                              args.probe_weight_decay, args.probe_tolerance, args.seed, args.device)
    index = fit_index(emb, concepts, args.output_dir, options)
    errors.log(f"index: {len(index.ids)} images, {len(index.cuis)} CUIs, {index.vectors.shape[1]} dimensions; "
               f"probe: {'none' if index.probe is None else 'linear' if not args.probe_hidden else 'one hidden layer'}"
               f"\nwrote: {args.output_dir}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from jjvmed.embeddings import load_embeddings
    from jjvmed.index import load_index, read_concept_csv, read_cui_sets
    from jjvmed.tuning import format_table, tune

    index = load_index(args.index_dir)
    valid = load_embeddings(args.valid_embeddings)
    gt = read_concept_csv(args.valid_concepts)
    generated = read_cui_sets(args.valid_generated) if args.valid_generated else None
    manual = read_concept_csv(args.valid_manual) if args.valid_manual else None
    start = time.perf_counter()
    settings, table = tune(index, valid, gt, generated, manual, args.device, args.per_cui_thresholds)
    files.write_text_atomic(args.output, json.dumps(settings, indent=1) + "\n")
    print(format_table(table))
    fused = settings["methods"]["fused"]
    errors.log(f"fused = {fused['source']}: F1 {fused['f1']:.4f} on {settings['tuned_on']['images']} validation "
               f"images (tuned there, so optimistic for the test set)\ntime: {time.perf_counter() - start:.1f} s\n"
               f"wrote: {args.output}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Through the engine's one pipeline: the embeddings file is the source, the concept writer fuses and
    writes format B, and the run checks it with the 2026 rules and zips it."""
    from jjvmed.fusion import load_settings, uses_generated
    from jjvmed.index import load_index, read_cui_sets
    from jjvmed.pipeline import RunConfig, run
    from jjvmed.sources import EmbeddingsFileSource
    from jjvmed.writers import ConceptWriter, VisionMethod

    settings = load_settings(args.settings, args.method)
    index = load_index(args.index_dir)
    generated = read_cui_sets(args.generated) if args.generated else None
    if uses_generated(settings) and generated is None:
        raise errors.UserError(f"the {args.method} settings fuse the generated concepts: add --generated "
                               "(ID,CUIs from generate_concepts.py on the same images)")
    vision = VisionMethod(args.method, index, settings, args.device)
    cfg = RunConfig(task="concepts", output_csv=args.output_csv, ids_csv=args.ids_csv, zip_path=args.zip)
    source = EmbeddingsFileSource(args.embeddings, extra_ids=list(generated or {}))
    return run(cfg, source, ConceptWriter(args.output_csv, vision=vision, given_cuis=generated))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"embed": run_embed, "fit": run_fit, "tune": run_tune, "predict": run_predict}[args.command](args)


if __name__ == "__main__":
    # Only `embed` resumes; Ctrl-C in the others just stops.
    sys.exit(errors.run_cli(main, hint=errors.RESUME_HINT if sys.argv[1:2] == ["embed"] else ""))
