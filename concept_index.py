"""Concepts from image encoders: embed images, fit the kNN index and probes, tune on validation, predict.

    python concept_index.py embed --image_dir /data/train/images --embeddings emb/train.npz
    python concept_index.py embed --image_dir /data/train/images --embeddings emb/train_biomedclip.npz \\
        --encoder open_clip:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
    python concept_index.py embed --image_dir /data/valid/images --embeddings emb/valid.npz
    python concept_index.py fit --embeddings emb/train.npz emb/train_biomedclip.npz \\
        --train_concepts train_concepts.csv --concept_index index/
    python concept_index.py tune --concept_index index/ --embeddings emb/valid.npz emb/valid_biomedclip.npz \\
        --valid_concepts valid_concepts.csv --generated results/valid_concepts.csv \\
        --concept_settings index/settings.json
    python concept_index.py predict --concept_index index/ --concept_settings index/settings.json --method fused \\
        --embeddings emb/test.npz emb/test_biomedclip.npz --output_csv results/concepts_fused.csv

Captions (generate_captions.py --method knn / rag): fit with the training captions too, and compare the caption
methods on validation:

    python concept_index.py fit --embeddings emb/train.npz --train_concepts train_concepts.csv \\
        --train_captions train_captions.csv --concept_index index/
    python concept_index.py tune_captions --concept_index index/ --embeddings emb/valid.npz \\
        --valid_captions valid_captions.csv --journals results/valid_rag.journal.jsonl

Only `embed` needs a GPU (one pass of an image encoder, no text generation); the rest runs on a CPU.
Several embeddings files of the same images (one per encoder) make an ensemble.
The library: jjvmed/encoders.py, preprocessing.py and embeddings.py (embed), index.py, probe.py and tables.py
(fit), tuning.py (tune), fusion.py (predict), retrieval.py and caption_tuning.py (tune_captions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jjvmed import errors, files
from jjvmed.fusion import METHODS
from jjvmed.model import DEFAULT_BASE_MODEL
from jjvmed.options import Parser, add_device_options

ENCODER_HELP = ("the image encoder: llava (the vision tower of --base_model_path), hf:ID_OR_FOLDER (CLIP / SigLIP "
                "vision towers, MedSigLIP, DINOv2 / RAD-DINO, any AutoModel), open_clip:ID_OR_FOLDER (BiomedCLIP), "
                "timm:NAME_ID_OR_FOLDER (ConvNeXt-V2, DenseNet, EfficientNet); repeat it to embed with several "
                "into one file (default: llava)")


def build_parser() -> Parser:
    parser = Parser(
        description="Concept detection from image encoders: image embeddings (LLaVA's vision tower or any open_clip, "
        "Hugging Face or timm encoder), nearest training images (kNN) and linear probes, ensembles of encoders, "
        "thresholds and fusion with the generated concepts tuned on the official F1.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{embed,fit,tune,predict,tune_captions}")

    embed = sub.add_parser("embed", help="one encoder pass over a folder of images -> one embeddings file",
                           description="Embed every image of a folder with an image encoder (preprocessed as its "
                           "model card prescribes, pooled and L2-normalised) into one .npz file that records the "
                           "encoder. Resumable: chunks are saved as they complete.")
    embed.add_argument("--image_dir", required=True, help="folder of images; the ID is the file name without "
                       "its extension")
    embed.add_argument("--embeddings", required=True, help="embeddings file to write (.npz)")
    embed.add_argument("--limit", type=int, default=None, help="only the first N images (a quick trial)")
    embed.add_argument("--encoder", action="append", default=None, metavar="SPEC", help=ENCODER_HELP)
    embed.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL,
                       help="hub ID or folder of the LLaVA model, for --encoder llava; no adapter is needed, the "
                       "LoRA does not touch the vision tower (default: %(default)s)")
    embed.add_argument("--pooling", choices=["default", "mean", "cls", "gem"], default="default",
                       help="default: the encoder's own image embedding (LLaVA: the mean of the patch tokens its "
                       "projector gets; CLIP: the projected embedding; SigLIP: its attention pool; DINOv2: the CLS "
                       "token; timm: its global pool); mean: mean of the tokens or the feature grid; cls: the CLS "
                       "token; gem: generalised-mean pooling of a CNN's feature grid (default: %(default)s)")
    embed.add_argument("--batch_size", type=int, default=None,
                       help="images per forward pass (default: 256 on a GPU, 32 on the CPU)")
    embed.add_argument("--chunk_size", type=int, default=4096,
                       help="images per checkpoint chunk; a killed run redoes at most one (default: %(default)s)")
    embed.add_argument("--num_workers", type=int, default=None,
                       help="processes decoding images (default: 16, at most cores - 1, with a GPU; 0 on CPU)")
    add_device_options(embed, "the encoder")
    embed.add_argument("--resume_from_checkpoint", choices=["auto"], default=None,
                       help="continue an earlier run of this command: auto = what it left beside --embeddings (the "
                       "finished chunks in <file>.parts/ and the file). Every embed does so anyway: the vectors of "
                       "images whose files are unchanged are kept, the rest embedded (README: Concepts from the "
                       "vision tower)")
    embed.add_argument("--overwrite", action="store_true",
                       help="discard finished chunks or file and start over (also what refuses: vectors of other "
                       "encoder settings there)")
    embed.rename("--output", "--embeddings")

    fit = sub.add_parser("fit", help="training embeddings + concepts -> kNN index and probes",
                         description="Index the training embeddings with their CUIs and train a probe per encoder "
                         "(multi-label BCE, stopped by the F1 on a held-out slice; seconds on a CPU for 8,000 "
                         "images); writes index.npz, probe.safetensors and probe.json. Several embeddings files of "
                         "the same images (one per encoder) make an ensemble.")
    fit.add_argument("--embeddings", required=True, nargs="+", action="extend", metavar="PATH",
                     help="embeddings of the training images (from embed); several for an ensemble")
    fit.add_argument("--train_concepts", default=None,
                     help="ID,CUIs CSV of the training images (CUIs joined by ;); for the concept methods")
    fit.add_argument("--train_captions", default=None,
                     help="ID,Caption CSV of the training images: the index keeps each one's caption, for "
                     "generate_captions.py --method knn / rag (with captions alone: no CUIs, no probe)")
    fit.add_argument("--concept_index", required=True, metavar="DIR", help="folder for the index and the probes")
    fit.add_argument("--probe_hidden", type=int, default=0,
                     help="units of one hidden layer; 0 trains a linear probe (default: %(default)s)")
    fit.add_argument("--probe_epochs", type=int, default=30,
                     help="passes over the training vectors at most; training stops earlier once the F1 on a "
                     "held-out slice of the training images has not risen for --probe_patience passes; 0 fits no "
                     "probe, kNN only (default: %(default)s)")
    fit.add_argument("--probe_patience", type=int, default=3,
                     help="passes without a better held-out F1 before training stops (default: %(default)s)")
    fit.add_argument("--probe_batch_size", type=int, default=256, help="images per step (default: %(default)s)")
    fit.add_argument("--probe_learning_rate", type=float, default=1e-2,
                     help="AdamW learning rate (default: %(default)s)")
    fit.add_argument("--probe_weight_decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0, help="random seed of the probe (default: %(default)s)")
    fit.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                     help="where the probe trains (default: %(default)s)")
    fit.rename("--train_embeddings", "--embeddings")
    fit.rename("--output_dir", "--concept_index")

    tune = sub.add_parser("tune", help="choose k, weights, thresholds and fusion on the validation split -> settings",
                          description="Maximise the official primary F1 on the validation split over each "
                          "encoder's k, neighbour weighting and probe/kNN blend, the encoders' weights, the "
                          "generated-concept weight, and how many CUIs an image keeps (one threshold, per-CUI "
                          "thresholds, relative to the top score, or a count from the scores, each judged on "
                          "held-out halves); print the F1 of each encoder and method alone, of the ensemble and "
                          "fused.")
    tune.add_argument("--concept_index", required=True, metavar="DIR", help="folder written by fit")
    tune.add_argument("--embeddings", required=True, nargs="+", action="extend", metavar="PATH",
                      help="embeddings of the validation images (from embed), one per encoder of the index")
    tune.add_argument("--valid_concepts", required=True, help="ground truth ID,CUIs of the validation images")
    tune.add_argument("--generated", default=None,
                      help="ID,CUIs from generate_concepts.py on the validation images, to tune the fusion with them")
    tune.add_argument("--gt_manual", default=None,
                      help="manual ground truth (valid_concepts_manual.csv): also report the secondary F1")
    tune.add_argument("--concept_settings", required=True, metavar="PATH", help="settings JSON to write")
    tune.add_argument("--per_cui_thresholds", action=argparse.BooleanOptionalAction, default=True,
                      help="try a threshold per CUI with enough validation support, kept only if it raises the "
                      "F1 on held-out halves (default: on)")
    tune.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                      help="where the kNN search and the probe run (default: %(default)s)")
    for old, new in (("--index_dir", "--concept_index"), ("--valid_embeddings", "--embeddings"),
                     ("--valid_generated", "--generated"), ("--valid_manual", "--gt_manual"),
                     ("--output", "--concept_settings")):
        tune.rename(old, new)

    predict = sub.add_parser("predict", help="embeddings (+ generated CUIs) -> ID,CUIs submission file",
                             description="Final CUIs per image with the tuned settings of one method.")
    predict.add_argument("--concept_index", required=True, metavar="DIR", help="folder written by fit")
    predict.add_argument("--concept_settings", required=True, metavar="PATH", help="settings JSON written by tune")
    predict.add_argument("--method", choices=METHODS, default="fused",
                         help="knn, probe, or fused (the best on validation) (default: %(default)s)")
    predict.add_argument("--embeddings", required=True, nargs="+", action="extend", metavar="PATH",
                         help="embeddings of the images to label (from embed), one per encoder the settings use")
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
    predict.rename("--index_dir", "--concept_index")
    predict.rename("--settings", "--concept_settings")

    captions = sub.add_parser(
        "tune_captions", help="compare the caption methods on the validation split by the relevance aggregate",
        description="Score on the validation split, by the local 2026 relevance aggregate (the parts that can run "
        "here: ROUGE-1 always, BERTScore and BLEURT when their model folders are given; BLEU shown too), knn at "
        "several numbers of neighbours (from the caption index and the validation embeddings, no model) and "
        "every generate_captions.py run on the validation images given by its journal (generate or rag, with its "
        "k; with candidates: the first, and the best of N by each reranker that scored them). Prints a table of "
        "each method alone, best first, and the options of the best.")
    captions.add_argument("--concept_index", required=True, metavar="DIR",
                          help="folder written by fit with --train_captions")
    captions.add_argument("--embeddings", required=True, nargs="+", action="extend", metavar="PATH",
                          help="embeddings of the validation images (from embed) with the index's encoders")
    captions.add_argument("--valid_captions", required=True, help="ground truth ID,Caption of the validation images")
    captions.add_argument("--journals", default=[], nargs="+", action="extend", metavar="PATH",
                          help="journals of generate_captions.py runs on the validation images (<output "
                          "stem>.journal.jsonl): --method generate or rag, with or without --candidates")
    captions.add_argument("--bertscore_model", metavar="DIR",
                          help="local folder of microsoft/deberta-xlarge-mnli for BERTScore (default: skipped)")
    captions.add_argument("--bertscore_layers", type=int, metavar="N",
                          help="layer bert-score uses (for models it knows by name: automatic)")
    captions.add_argument("--bleurt_model", metavar="DIR",
                          help="local folder of lucadiliello/BLEURT-20-D12 for BLEURT (default: skipped)")
    captions.add_argument("--bleurt_batch_size", type=int, default=8, metavar="N",
                          help="pairs per BLEURT batch (default 8, as the organisers)")
    captions.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                          help="where the kNN search runs (default: %(default)s)")
    return parser


def run_embed(args: argparse.Namespace) -> int:
    from jjvmed.embeddings import EmbedOptions, ensure_embeddings
    from jjvmed.images import list_images

    if args.limit is not None and args.limit < 1:
        raise errors.UserError(f"--limit must be at least 1, got {args.limit}")
    if args.num_workers is not None and args.num_workers < 0:
        raise errors.UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    files.check_writable(args.embeddings, "embeddings file")
    items = list_images(args.image_dir)[: args.limit]
    options = EmbedOptions(args.base_model_path, args.pooling, args.batch_size, args.chunk_size, args.device,
                           args.dtype, args.num_workers, overwrite=args.overwrite,
                           encoders=tuple(args.encoder or ["llava"]))
    start = time.perf_counter()
    made = ensure_embeddings(items, args.embeddings, options)
    seconds = time.perf_counter() - start
    rate = f" ({made.embedded / made.seconds:.1f} images/s while embedding)" if made.embedded and made.seconds else ""
    errors.log(f"images: {len(items)} (embedded now: {made.embedded}, reused: {made.reused}, failed: "
               f"{len(made.embeddings.failed)})\ntime: {seconds:.1f} s{rate}\nwrote: {args.embeddings}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from jjvmed.embeddings import load_ensemble
    from jjvmed.index import fit_index
    from jjvmed.probe import ProbeOptions
    from jjvmed.tables import read_cui_lists, read_id_table

    for name in ("probe_hidden", "probe_epochs", "probe_patience"):
        if getattr(args, name) < 0:
            raise errors.UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.probe_batch_size < 1:
        raise errors.UserError(f"--probe_batch_size must be at least 1, got {args.probe_batch_size}")
    if not args.train_concepts and not args.train_captions:
        raise errors.UserError("give --train_concepts, --train_captions, or both")
    check_writable_folder(args.concept_index, "concept index")
    emb = load_ensemble(args.embeddings)
    concepts = read_cui_lists(args.train_concepts) if args.train_concepts else None
    captions = read_id_table(args.train_captions, "Caption") if args.train_captions else None
    options = ProbeOptions(args.probe_hidden, args.probe_epochs, args.probe_batch_size, args.probe_learning_rate,
                           args.probe_weight_decay, args.probe_patience, seed=args.seed, device=args.device)
    start = time.perf_counter()
    index = fit_index(emb, concepts, args.concept_index, options, captions)
    probe = "none" if not args.probe_epochs or not index.cuis else "linear" if not args.probe_hidden \
        else "one hidden layer"
    encoders = ", ".join(f"{m.label} ({m.vectors.shape[1]} dimensions)" for m in index.members)
    with_captions = ", with captions" if index.captions is not None else ""
    errors.log(f"index: {len(index.ids)} images{with_captions}, {len(index.cuis)} CUIs; encoders: {encoders}; "
               f"probe: {probe}\n"
               f"time: {time.perf_counter() - start:.1f} s\nwrote: {args.concept_index}")
    return 0


def check_writable_folder(folder: str, what: str) -> None:
    """Before any work: `folder` is, or can be made, a writable folder (the outputs' own check, on a file in it)."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise errors.UserError(f"the {what} {folder} is a file; give a folder")
    files.check_writable(Path(folder) / "index.npz", what)


def check_has_concepts(index, folder: str) -> None:
    if not index.cuis:
        raise errors.UserError(f"the index in {folder} has no concepts (fitted with --train_captions alone): fit it "
                               "with --train_concepts for the concept methods")


def run_tune(args: argparse.Namespace) -> int:
    from jjvmed.embeddings import load_ensemble
    from jjvmed.index import load_index
    from jjvmed.tables import read_concept_csv, read_cui_lists
    from jjvmed.tuning import format_table, tune

    files.check_writable(args.concept_settings, "settings file")
    index = load_index(args.concept_index)
    check_has_concepts(index, args.concept_index)
    valid = load_ensemble(args.embeddings)
    for member in index.members:
        valid.member(member.encoder, "the concept index")  # every encoder of the index, before any work
    gt = read_concept_csv(args.valid_concepts)
    generated = read_cui_lists(args.generated) if args.generated else None
    manual = read_concept_csv(args.gt_manual) if args.gt_manual else None
    start = time.perf_counter()
    settings, table = tune(index, valid, gt, generated, manual, args.device, args.per_cui_thresholds)
    files.write_text_atomic(args.concept_settings, json.dumps(settings, indent=1) + "\n")
    print(format_table(table))
    fused = settings["methods"]["fused"]
    errors.log(f"fused = {fused['source']}: F1 {fused['f1']:.4f} on {settings['tuned_on']['images']} validation "
               f"images (tuned there, so optimistic for the test set), {fused['f1_heldout']:.4f} tuned and scored on "
               f"held-out halves\ntime: {time.perf_counter() - start:.1f} s\nwrote: {args.concept_settings}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """Through the engine's one pipeline: the embeddings files are the source, the concept writer fuses and
    writes format B, and the run checks it with the 2026 rules and zips it."""
    from jjvmed.embeddings import check_has_ids, load_embeddings
    from jjvmed.fusion import load_settings, uses_generated
    from jjvmed.index import load_index
    from jjvmed.pipeline import RunConfig, run
    from jjvmed.sources import EmbeddingsFileSource
    from jjvmed.tables import read_cui_lists
    from jjvmed.writers import ConceptWriter, VisionMethod

    index = load_index(args.concept_index)
    check_has_concepts(index, args.concept_index)
    settings = load_settings(args.concept_settings, args.method, index)
    generated = read_cui_lists(args.generated) if args.generated else None
    if uses_generated(settings) and generated is None:
        raise errors.UserError(f"the {args.method} settings fuse the generated concepts: add --generated "
                               "(ID,CUIs from generate_concepts.py on the same images)")
    if generated is not None:
        # A generated row without a vector would be a row of nothing but generated CUIs (or, for knn and probe,
        # an empty one): most likely the CUIs of other images than the embeddings'.
        check_has_ids(load_embeddings(args.embeddings[0], vectors=False), list(generated), args.embeddings[0],
                      f"images of {args.generated}", "give the embeddings and the generated CUIs of the same images "
                      "(an image that could not be embedded is listed in its embeddings file)")
    vision = VisionMethod(args.method, index, settings, args.device)
    cfg = RunConfig(task="concepts", output_csv=args.output_csv, ids_csv=args.ids_csv, zip_path=args.zip)
    source = EmbeddingsFileSource(args.embeddings, vision, extra_ids=list(generated or {}))
    return run(cfg, source, ConceptWriter(args.output_csv, vision=vision, given_cuis=generated))


def run_tune_captions(args: argparse.Namespace) -> int:
    """knn at each k and every journal given, scored on the same validation images; the table, best first."""
    from jjvmed.caption_tuning import format_table, journal_contenders, knn_contenders, parts_that_ran, score_contenders
    from jjvmed.embeddings import load_ensemble
    from jjvmed.index import load_index
    from jjvmed.model import resolve_device
    from jjvmed.retrieval import check_caption_index, query_vectors
    from jjvmed.tables import read_id_table

    index = load_index(args.concept_index)
    check_caption_index(index, args.concept_index)
    valid = load_ensemble(args.embeddings)
    query_vectors(index, valid, "the caption index")  # every encoder of the index, before any work
    gt = read_id_table(args.valid_captions, "Caption")
    from_journals = [c for path in args.journals for c in journal_contenders(path)]  # all read before scoring
    start = time.perf_counter()
    contenders = knn_contenders(index, valid, list(gt), resolve_device(args.device)) + from_journals
    rows, ids = score_contenders(gt, contenders, args.bertscore_model, args.bertscore_layers, args.bleurt_model,
                                 args.bleurt_batch_size)
    print(format_table(rows))
    best = rows[0]
    errors.log(f"scored on {len(ids)} validation images (those every method has, of {len(gt)}); "
               f"{parts_that_ran(best.summary)}\nbest: {best.contender.name}: {best.contender.options}\n"
               f"time: {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "embed":
        from jjvmed.embeddings import parts_dir
        from jjvmed.signals import StopSignals

        # Ctrl-C or SIGTERM during embed advises a resume only once a chunk is saved (before, there is nothing
        # to resume, and the same command simply runs again).
        manifest = parts_dir(Path(args.embeddings)) / "manifest.json"
        with StopSignals("", hint=lambda: errors.RESUME_HINT if manifest.exists() else ""):
            return run_embed(args)
    return {"embed": run_embed, "fit": run_fit, "tune": run_tune, "predict": run_predict,
            "tune_captions": run_tune_captions}[args.command](args)


if __name__ == "__main__":
    # Only `embed` resumes, and only once a chunk is saved (main installs that hint); Ctrl-C elsewhere just stops.
    sys.exit(errors.run_cli(main, hint=""))
