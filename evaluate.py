"""Official ImageCLEFmedical Caption scores, run locally; the submission checks live in submission.py.

    python evaluate.py concepts --gt valid_concepts.csv --pred results/concepts.csv \
        --gt_manual valid_concepts_manual.csv
    python evaluate.py captions --gt valid_captions.csv --pred results/captions.csv \
        [--bertscore_model DIR] [--bleurt_model DIR]
    python evaluate.py validate --task concepts --pred results/concepts.csv --ids ids.csv --zip upload.zip

Concept F1 follows the official evaluator exactly, including how its reader turns a row into
concepts: `ID` alone is no concept, `ID,` is the one empty concept '', `C1;` adds '' as a concept.
Caption metrics use the official preprocessing; only metrics that run offline are computed, and a
metric whose model is not available is skipped and said so, never estimated.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import errors
import files
import images
from submission import (
    RULES,
    Report,
    caption_pairs,
    concept_pairs,
    expected_ids,
    log_report,
    read_id_list,
    read_rows,
    validate_file,
    write_zip,
)

# The 2025 secondary-score list: imaging modalities and body regions.
ALLOWED_CUIS_2025 = (
    "C0002978", "C0040405", "C0024485", "C0032743", "C0041618", "C1306645", "C0920367",
    "C1140618", "C0037949", "C0030797", "C0023216", "C0037303", "C0817096", "C0006141", "C0000726",
)


# ---------------------------------------------------------------------------------------------
# Concept scores
# ---------------------------------------------------------------------------------------------


def image_f1(gt: tuple[str, ...], pred: tuple[str, ...]) -> float:
    """The official per-image F1 over the union of upper-cased concepts.

    The official script builds binary vectors over the sorted union and calls sklearn's
    f1_score(average="binary"); that is exactly 2TP / (2TP + FP + FN) on the two sets, which this
    computes directly: sklearn's input checks cost ~4 ms an image, over a minute for a test set.
    tests/test_evaluate.py checks the two agree on real data.
    """
    gt_set = {c.upper() for c in gt}
    pred_set = {c.upper() for c in pred}
    tp = len(gt_set & pred_set)
    denominator = len(gt_set) + len(pred_set)
    return 2 * tp / denominator if denominator else 0.0


def concept_scores(gt: dict[str, tuple[str, ...]], pred: dict[str, tuple[str, ...]],
                   manual: dict[str, tuple[str, ...]] | None = None,
                   allowed: tuple[str, ...] = ALLOWED_CUIS_2025) -> tuple[dict, list[dict]]:
    """(summary, per-image rows): primary F1 and, with manual ground truth, secondary F1."""
    per_image: dict[str, dict] = {}
    primary = []
    for image_id, concepts in gt.items():
        if not concepts:  # only a row with no second field is an empty set; it is not counted
            continue
        score = image_f1(concepts, pred.get(image_id, ()))
        primary.append(score)
        per_image[image_id] = {"ID": image_id, "f1": score, "gt": len(concepts), "pred": len(pred.get(image_id, ()))}
    summary: dict = {"f1": sum(primary) / len(primary) if primary else 0.0, "images_scored": len(primary)}
    if manual is not None:
        allowed_set = {c.upper() for c in allowed}
        secondary = []
        for image_id, concepts in manual.items():
            gt_f = tuple(c for c in concepts if c.upper() in allowed_set)
            if not gt_f:
                continue
            pred_f = tuple(c for c in pred.get(image_id, ()) if c.upper() in allowed_set)
            score = image_f1(gt_f, pred_f)
            secondary.append(score)
            per_image.setdefault(image_id, {"ID": image_id})["f1_secondary"] = score
        summary["f1_secondary"] = sum(secondary) / len(secondary) if secondary else 0.0
        summary["images_scored_secondary"] = len(secondary)
    return summary, list(per_image.values())


# ---------------------------------------------------------------------------------------------
# Caption scores
# ---------------------------------------------------------------------------------------------

PUNCTUATION = str.maketrans("", "", string.punctuation)


def preprocess_caption(text: str) -> str:
    """Official preprocessing: lower-case, every run of digits -> 'number', ASCII punctuation removed."""
    return re.sub(r"\d+", "number", text.lower()).translate(PUNCTUATION)


def rouge1_scores(gts: list[str], preds: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    return [1.0 if not g.strip() and not p.strip() else scorer.score(g, p)["rouge1"].fmeasure
            for g, p in zip(gts, preds, strict=True)]


def bleu_scores(gts: list[str], preds: list[str]) -> dict[str, float]:
    """Corpus BLEU-1 and BLEU-4 (sacrebleu, 0-1) on the preprocessed captions."""
    from sacrebleu.metrics import BLEU

    out = {}
    for n in (1, 4):
        out[f"bleu{n}"] = BLEU(max_ngram_order=n, effective_order=True).corpus_score(preds, [gts]).score / 100.0
    return out


def bertscore_f1(gts: list[str], preds: list[str], model: str, num_layers: int | None) -> list[float]:
    """BERTScore F1 with idf from the ground-truth captions (bert-score package, a local model folder)."""
    import bert_score

    folder = Path(model)
    if not (folder / "config.json").exists():
        raise errors.UserError(f"--bertscore_model {model} is not a local model folder (no config.json)")
    if num_layers is None:
        name = folder.name.lower()
        num_layers = bert_score.utils.model2layers.get(next((k for k in bert_score.utils.model2layers
                                                              if name.endswith(k.split("/")[-1])), ""), None)
        if num_layers is None:
            raise errors.UserError("--bertscore_layers is needed for a model bert-score does not know by name")
    # Empty captions never reach bert-score (it fails on them with transformers 5): both empty scores
    # 1 as officially, one empty scores 0.
    scores = [1.0 if not g.strip() and not p.strip() else 0.0 for g, p in zip(gts, preds, strict=True)]
    todo = [i for i, (g, p) in enumerate(zip(gts, preds, strict=True)) if g.strip() and p.strip()]
    if todo:
        _, _, f1 = bert_score.score([preds[i] for i in todo], [gts[i] for i in todo], model_type=str(folder),
                                    num_layers=num_layers, idf=True, lang="en", verbose=False, batch_size=32)
        for i, s in zip(todo, f1.tolist(), strict=True):
            scores[i] = float(s)
    return scores


# bleurt-pytorch 0.0.1 (what the organisers install) was written for transformers 4. On transformers 5 its
# own classes run after three mends, applied only where the name is missing:
# - `transformers.pytorch_utils.find_pruneable_heads_and_indices` is gone and the package imports it
#   (ImportError): it is only used to prune attention heads, which scoring never does, so a stand-in
#   that refuses is enough;
# - `transformers.models.bert.tokenization_bert_fast` is gone (ModuleNotFoundError): BertTokenizerFast
#   now lives in transformers itself, so an alias module provides it;
# - PreTrainedModel lost `get_extended_attention_mask` and `get_head_mask`, which BleurtModel.forward
#   calls (AttributeError): the two transformers-4 helpers are added back to the package's base class,
#   for the encoder case BLEURT is (a padding mask; no head mask).


def refuse_head_pruning(*args, **kwargs):
    raise NotImplementedError("pruning attention heads is not supported here")


def extended_attention_mask(self, attention_mask, input_shape):
    """transformers 4's mask for an encoder: 0 where attended, the dtype's minimum on padding."""
    import torch

    mask = attention_mask[:, None, None, :].to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def no_head_mask(self, head_mask, num_hidden_layers):
    if head_mask is not None:
        raise NotImplementedError("head_mask is not supported here")
    return [None] * num_hidden_layers


def bleurt_classes() -> tuple:
    """(BleurtForSequenceClassification, BleurtSPTokenizer, BleurtTokenizerFast) from bleurt-pytorch, mended."""
    import importlib
    import types

    import transformers
    import transformers.pytorch_utils as pytorch_utils

    if not hasattr(pytorch_utils, "find_pruneable_heads_and_indices"):
        pytorch_utils.find_pruneable_heads_and_indices = refuse_head_pruning
    alias = "transformers.models.bert.tokenization_bert_fast"
    try:
        importlib.import_module(alias)
    except ModuleNotFoundError:
        module = types.ModuleType(alias)
        module.BertTokenizerFast = transformers.BertTokenizerFast
        sys.modules[alias] = module
    try:
        from bleurt_pytorch import BleurtForSequenceClassification
        from bleurt_pytorch.bleurt.modeling_bleurt import BleurtPreTrainedModel
        from bleurt_pytorch.bleurt.tokenization_bleurt_fast import BleurtTokenizerFast
        from bleurt_pytorch.bleurt.tokenization_bleurt_sp import BleurtSPTokenizer
    except ImportError as e:
        raise errors.UserError(f"--bleurt_model needs bleurt-pytorch (pip install -r requirements.txt): "
                               f"{errors.first_line(e)}") from None
    if not hasattr(BleurtPreTrainedModel, "get_extended_attention_mask"):
        BleurtPreTrainedModel.get_extended_attention_mask = extended_attention_mask
    if not hasattr(BleurtPreTrainedModel, "get_head_mask"):
        BleurtPreTrainedModel.get_head_mask = no_head_mask
    return BleurtForSequenceClassification, BleurtSPTokenizer, BleurtTokenizerFast


def load_bleurt(model: str):
    """(model, tokenizer) from a local BLEURT folder, e.g. lucadiliello/BLEURT-20-D12."""
    import torch

    folder = Path(model)
    if not (folder / "config.json").exists():
        raise errors.UserError(f"--bleurt_model {model} is not a local model folder (no config.json)")
    model_class, sentencepiece_class, wordpiece_class = bleurt_classes()
    # The package's BleurtTokenizer tries the WordPiece class and falls back to the sentencepiece one when
    # that raises. On transformers 5 the WordPiece class loads a folder without vocab.txt instead of
    # raising, and maps every word to [UNK]; so choose by the files, as that fallback did.
    if (folder / "vocab.txt").exists() or (folder / "tokenizer.json").exists():
        tokenizer = wordpiece_class.from_pretrained(str(folder))
    elif (folder / "spm.model").exists():
        try:
            tokenizer = sentencepiece_class.from_pretrained(str(folder))
        except (ImportError, ValueError) as e:  # reading spm.model needs sentencepiece and protobuf
            raise errors.UserError(f"cannot read {folder / 'spm.model'} (pip install -r requirements.txt): "
                                   f"{errors.first_line(e)}") from None
    else:
        raise errors.UserError(f"--bleurt_model {model} has no tokenizer (spm.model, vocab.txt or tokenizer.json)")
    # float32 as transformers 4 loaded it; transformers 5 would otherwise follow the checkpoint's dtype.
    net = model_class.from_pretrained(str(folder), dtype=torch.float32).eval()
    return net, tokenizer


def bleurt_scores(gts: list[str], preds: list[str], model: str, batch_size: int = 8) -> list[float]:
    """BLEURT for each (reference, candidate) pair, as the organisers compute it.

    Batches of 8 (their default), padded to the longest pair, truncated at 512 tokens; every pair goes
    through the model, empty captions included (no special case, unlike ROUGE and BERTScore).
    """
    import torch

    net, tokenizer = load_bleurt(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    scores: list[float] = []
    for start in range(0, len(gts), max(1, batch_size)):
        refs, cands = gts[start:start + batch_size], preds[start:start + batch_size]
        with torch.inference_mode():
            inputs = tokenizer(refs, cands, padding="longest", return_tensors="pt", truncation=True, max_length=512)
            logits = net(**{k: v.to(device) for k, v in inputs.items()}).logits
        scores.extend(float(s) for s in logits.flatten().cpu().tolist())
    return scores


# The 2026 aggregates: (summary key, name) of each part, averaged with equal weight.
RELEVANCE_PARTS = (("bertscore_f1", "BERTScore"), ("rouge1", "ROUGE-1"), ("medimageinsight", "MedImageInsight"),
                   ("bleurt", "BLEURT"))
FACTUALITY_PARTS = (("medcat_f1", "MedCAT"), ("alignscore", "AlignScore"))


def aggregate(summary: dict, name: str, parts: tuple[tuple[str, str], ...]) -> dict:
    """The official mean when every part ran; otherwise `<name>_partial`, naming what was left out."""
    present = [key for key, _ in parts if key in summary]
    skipped = [label for key, label in parts if key not in summary]
    if not skipped:
        return {name: sum(summary[k] for k in present) / len(present)}
    return {f"{name}_partial": {"value": sum(summary[k] for k in present) / len(present) if present else None,
                                "parts": f"{len(present)} of {len(parts)}", "skipped": skipped}}


def caption_scores(gt: dict[str, str], pred: dict[str, str], bertscore_model: str | None = None,
                   bertscore_layers: int | None = None, bleurt_model: str | None = None,
                   bleurt_batch_size: int = 8) -> tuple[dict, list[dict]]:
    ids = list(gt)
    gts = [preprocess_caption(gt[i]) for i in ids]
    preds = [preprocess_caption(pred.get(i, "")) for i in ids]
    rouge = rouge1_scores(gts, preds)
    summary: dict = {"images_scored": len(ids), "rouge1": sum(rouge) / max(len(ids), 1), **bleu_scores(gts, preds)}
    rows = [{"ID": i, "rouge1": r} for i, r in zip(ids, rouge, strict=True)]
    per_pair: dict[str, list[float]] = {}
    skipped = []
    if bertscore_model:
        per_pair["bertscore_f1"] = bertscore_f1(gts, preds, bertscore_model, bertscore_layers)
    else:
        skipped.append("bertscore_f1 (give --bertscore_model, a local microsoft/deberta-xlarge-mnli folder)")
    if bleurt_model:
        per_pair["bleurt"] = bleurt_scores(gts, preds, bleurt_model, bleurt_batch_size)
    else:
        skipped.append("bleurt (give --bleurt_model, a local lucadiliello/BLEURT-20-D12 folder)")
    for key, scores in per_pair.items():
        summary[key] = sum(scores) / max(len(ids), 1)
        for row, score in zip(rows, scores, strict=True):
            row[key] = score
    skipped.append("MedImageInsight similarity, UMLS-concept F1 (MedCAT), AlignScore: need models this tool does "
                   "not ship")
    summary.update(aggregate(summary, "relevance", RELEVANCE_PARTS))
    summary.update(aggregate(summary, "factuality", FACTUALITY_PARTS))
    summary["skipped"] = skipped
    return summary, rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def write_per_image(path: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    files.write_csv_atomic(path, columns, ([r.get(c, "") for c in columns] for r in rows))


def print_summary(title: str, summary: dict, report: Report) -> None:
    print(title)
    for key, value in summary.items():
        if key == "skipped":
            for item in value:
                print(f"  {'skipped':<24}{item}")
        elif key.endswith("_partial"):
            name = key.removesuffix("_partial")
            if value["value"] is None:
                print(f"  {name} (skipped: {', '.join(value['skipped'])})")
            else:
                print(f"  {name} (partial: {value['parts']} parts; skipped {', '.join(value['skipped'])})  "
                      f"{value['value']:.4f}  not the official score")
        else:
            print(f"  {key:<24}{value:.4f}" if isinstance(value, float) else f"  {key:<24}{value}")
    print(f"  {'submission check':<24}{'accepted' if report.accepted else 'REJECTED, see above'} "
          f"({report.rules} rules)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score and check ImageCLEFmedical Caption submissions locally, "
                                     "with the official definitions.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("concepts", help="primary (and secondary) concept-detection F1")
    c.add_argument("--gt", required=True, help="ground truth, ID,CUIs")
    c.add_argument("--pred", required=True, help="your submission, ID,CUIs")
    c.add_argument("--gt_manual", help="manual ground truth (ID,CUIs) for the secondary F1")
    c.add_argument("--allowed_cuis", help="CUIs counted by the secondary F1: a file with one per line or a "
                   "comma/semicolon-separated list (default: the 2025 list of modalities and body regions)")
    k = sub.add_parser("captions", help="caption scores that run offline: ROUGE-1, BLEU-1/4, BERTScore, BLEURT")
    k.add_argument("--gt", required=True, help="ground truth, ID,Caption")
    k.add_argument("--pred", required=True, help="your submission, ID,Caption")
    k.add_argument("--bertscore_model", help="local folder of microsoft/deberta-xlarge-mnli for BERTScore")
    k.add_argument("--bertscore_layers", type=int, help="layer bert-score uses (known models: automatic)")
    k.add_argument("--bleurt_model", help="local folder of lucadiliello/BLEURT-20-D12 for BLEURT")
    k.add_argument("--bleurt_batch_size", type=int, default=8, help="pairs per BLEURT batch (default 8, as the "
                   "organisers)")
    v = sub.add_parser("validate", help="check a submission against every rule the platform rejects on")
    v.add_argument("--task", choices=["concepts", "captions"], required=True)
    v.add_argument("--pred", required=True, help="the submission file")
    ids = v.add_mutually_exclusive_group()
    ids.add_argument("--gt", help="ground-truth CSV whose first column lists the expected IDs, in order")
    ids.add_argument("--ids", help="the organisers' ids.csv (first column, in order) or a folder of the test images")
    v.add_argument("--zip", help="write the upload zip (only submission.csv inside) here if the file is accepted")
    for p in (c, k, v):
        p.add_argument("--rules", choices=RULES, default="2026", help="which edition's submission rules to check "
                       "(default 2026; 2025 reads older files the lenient way)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    for p in (c, k):
        p.add_argument("--per_image", help="write each image's scores to this CSV")
    r = sub.add_parser("report", help="error analysis: one self-contained HTML page with the scores, a per-CUI "
                       "table and a card per image")
    r.add_argument("--out", required=True, help="the HTML file to write")
    r.add_argument("--image_dir", help="folder of the images, for the cards' thumbnails")
    r.add_argument("--concepts_gt", help="concept ground truth, ID,CUIs")
    r.add_argument("--concepts_pred", help="your concept run, ID,CUIs")
    r.add_argument("--gt_manual", help="manual ground truth (ID,CUIs) for the secondary F1")
    r.add_argument("--allowed_cuis", help="CUIs counted by the secondary F1 (as for the concepts command)")
    r.add_argument("--concepts_method", action="append", metavar="NAME=CSV", help="another concept method's ID,CUIs "
                   "file, shown and scored on each card beside --concepts_pred (repeatable)")
    r.add_argument("--captions_gt", help="caption ground truth, ID,Caption")
    r.add_argument("--captions_pred", help="your caption run, ID,Caption")
    r.add_argument("--bertscore_model", help="local folder of microsoft/deberta-xlarge-mnli for BERTScore")
    r.add_argument("--bertscore_layers", type=int, help="layer bert-score uses (known models: automatic)")
    r.add_argument("--cui_mapping_file", default=str(Path(__file__).resolve().parent / "data" / "cui_names.csv"),
                   help="names shown beside the CUIs: CUI plus a name column (default: data/cui_names.csv)")
    r.add_argument("--title", help="the page's title")
    r.add_argument("--limit", type=int, help="only the first N ground-truth images, in ID order")
    return parser


def allowed_list(value: str | None) -> tuple[str, ...]:
    if not value:
        return ALLOWED_CUIS_2025
    text = Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value
    cuis = tuple(c.strip().upper() for c in re.split(r"[\s,;]+", text) if c.strip() and c.strip().upper() != "CUI")
    if not cuis:
        raise errors.UserError(f"--allowed_cuis {value} lists no CUIs")
    return cuis


def validate(args: argparse.Namespace) -> int:
    if args.zip and not (args.gt or args.ids):
        raise errors.UserError("--zip needs --ids or --gt: without the expected IDs their set and order are not "
                               "checked")
    if args.zip and args.rules != "2026":
        raise errors.UserError("--zip checks with the 2026 rules, the platform's; leave out --rules 2025")
    expected = expected_ids(args.gt or args.ids) if (args.gt or args.ids) else None
    report = validate_file(args.task, args.pred, expected, args.rules)
    written = write_zip(args.pred, args.zip) if args.zip and report.accepted else None
    if args.json:
        print(json.dumps({"accepted": report.accepted, "rules": report.rules, "errors": report.errors,
                          "warnings": report.warnings, "zip": str(written) if written else None}, indent=2))
    else:
        log_report(report, args.pred)
        if expected is None:
            errors.log("  note: no --ids or --gt, so the ID set and order were not checked")
    if written:
        errors.log(f"wrote {written} (submission.csv inside): upload this file")
    elif args.zip:
        stale = f" ({args.zip} is from an earlier run: do not upload it)" if Path(args.zip).exists() else ""
        errors.log(f"no zip written: {args.pred} is REJECTED; fix the errors above and run again{stale}")
    return 0 if report.accepted else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return run_report(args)
    if args.command == "validate":
        return validate(args)
    gt_rows, pred_rows = read_rows(args.gt), read_rows(args.pred)
    expected = read_id_list(args.gt)  # the ground truth's order is the order the platform wants
    if args.command == "concepts":
        manual = concept_pairs(read_rows(args.gt_manual)) if args.gt_manual else None
        if manual is not None:  # the platform adds the manual ground truth's other IDs after the primary's
            known = set(expected)
            expected += [i for i in read_id_list(args.gt_manual) if i not in known]
        summary, rows = concept_scores(concept_pairs(gt_rows), concept_pairs(pred_rows), manual,
                                       allowed_list(args.allowed_cuis))
    else:
        summary, rows = caption_scores(caption_pairs(gt_rows), caption_pairs(pred_rows), args.bertscore_model,
                                       args.bertscore_layers, args.bleurt_model, args.bleurt_batch_size)
    report = validate_file(args.command, args.pred, expected, args.rules)
    if args.per_image:
        write_per_image(args.per_image, rows)
    if args.json:
        print(json.dumps({**summary, "accepted": report.accepted, "rules": report.rules, "errors": report.errors,
                          "warnings": report.warnings}, indent=2))
    else:
        if not report.accepted or report.warnings:
            log_report(report, args.pred, limit=10)
        print_summary(f"{args.command}: {args.pred} vs {args.gt}", summary, report)
    return 0 if report.accepted else 1


# The report, step by step: check the options, read the files, score, make one card per image, write the page.

def check_report_options(args: argparse.Namespace) -> None:
    concepts, captions = bool(args.concepts_gt or args.concepts_pred), bool(args.captions_gt or args.captions_pred)
    if not concepts and not captions:
        raise errors.UserError("report needs --concepts_gt and --concepts_pred, --captions_gt and --captions_pred, "
                               "or both pairs")
    if concepts and not (args.concepts_gt and args.concepts_pred):
        raise errors.UserError("give both --concepts_gt and --concepts_pred")
    if captions and not (args.captions_gt and args.captions_pred):
        raise errors.UserError("give both --captions_gt and --captions_pred")
    if (args.gt_manual or args.concepts_method) and not concepts:
        raise errors.UserError("--gt_manual and --concepts_method need --concepts_gt and --concepts_pred")
    if args.limit is not None and args.limit < 1:
        raise errors.UserError(f"--limit must be at least 1, not {args.limit}")


@dataclass
class ReportData:
    """What the report shows, as read from the files (an absent pair of files reads as empty)."""

    concepts_gt: dict[str, tuple[str, ...]]
    concepts_pred: dict[str, tuple[str, ...]]
    captions_gt: dict[str, str]
    captions_pred: dict[str, str]
    methods: dict[str, dict[str, tuple[str, ...]]]  # --concepts_method NAME -> its concepts by ID
    cui_names: dict[str, str]
    ids: list[str]  # the images shown: the ground truth's IDs in natural order, the first --limit of them
    ground_truth_images: int  # all of them


def read_report_data(args: argparse.Namespace) -> ReportData:
    from cui_mapper import CuiMapper

    methods = {}
    for spec in args.concepts_method or []:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path:
            raise errors.UserError(f"--concepts_method {spec}: write it as NAME=CSV")
        methods[name.strip()] = concept_pairs(read_rows(path))
    try:
        cui_names = CuiMapper.from_csv(args.cui_mapping_file).names
    except ValueError as e:
        raise errors.UserError(str(e)) from None
    c_gt_rows, c_pred_rows, k_gt_rows, k_pred_rows = (read_rows(path) if path else [] for path in (
        args.concepts_gt, args.concepts_pred, args.captions_gt, args.captions_pred))
    c_gt, k_gt = concept_pairs(c_gt_rows), caption_pairs(k_gt_rows)
    all_ids = sorted(dict.fromkeys([*c_gt, *k_gt]), key=images.id_sort_key)
    return ReportData(c_gt, concept_pairs(c_pred_rows), k_gt, caption_pairs(k_pred_rows), methods, cui_names,
                      all_ids[:args.limit] if args.limit else all_ids, len(all_ids))


def submission_verdict(report: Report, limited: bool) -> str:
    if limited:
        return "not run with --limit"
    problems = f"REJECTED ({len(report.errors)} problems, listed by the validate command)"
    return "accepted" if report.accepted else problems


def report_concept_scores(args: argparse.Namespace, data: ReportData) -> tuple[dict, list[dict]]:
    """The concepts part of the page's summary and each image's scores, other methods' F1 included."""
    keep = set(data.ids)
    gt = {i: c for i, c in data.concepts_gt.items() if i in keep}
    manual = ({i: c for i, c in concept_pairs(read_rows(args.gt_manual)).items() if i in keep}
              if args.gt_manual else None)
    summary, rows = concept_scores(gt, data.concepts_pred, manual, allowed_list(args.allowed_cuis))
    for name, pred in data.methods.items():
        method_summary, method_rows = concept_scores(gt, pred)
        summary[f"f1 {name}"] = method_summary["f1"]
        rows += [{"ID": r["ID"], f"f1 {name}": r["f1"]} for r in method_rows]
    verdict = submission_verdict(validate_file("concepts", args.concepts_pred, read_id_list(args.concepts_gt)),
                                 bool(args.limit))
    return {**summary, "submission check": verdict}, rows


def report_caption_scores(args: argparse.Namespace, data: ReportData) -> tuple[dict, list[dict]]:
    """The captions part of the page's summary and each image's scores."""
    keep = set(data.ids)
    summary, rows = caption_scores({i: c for i, c in data.captions_gt.items() if i in keep}, data.captions_pred,
                                   args.bertscore_model, args.bertscore_layers)
    verdict = submission_verdict(validate_file("captions", args.captions_pred, read_id_list(args.captions_gt)),
                                 bool(args.limit))
    return {**summary, "submission check": verdict}, rows


def report_scores(args: argparse.Namespace, data: ReportData) -> tuple[dict, dict[str, dict[str, float]]]:
    """The page's summary, and image ID -> its scores."""
    shown = len(data.ids)
    run: dict = {"images": shown if shown == data.ground_truth_images else f"first {shown:,} of "
                 f"{data.ground_truth_images:,} (--limit)"}
    summary: dict = {"run": run}
    rows: list[dict] = []
    if args.concepts_gt:
        run["concepts"] = f"{args.concepts_pred} vs {args.concepts_gt}"
        summary["concepts"], concept_rows = report_concept_scores(args, data)
        rows += concept_rows
    if args.captions_gt:
        run["captions"] = f"{args.captions_pred} vs {args.captions_gt}"
        summary["captions"], caption_rows = report_caption_scores(args, data)
        rows += caption_rows
    scores: dict[str, dict[str, float]] = {i: {} for i in data.ids}
    for row in rows:
        scores[row["ID"]].update({k: v for k, v in row.items() if isinstance(v, float)})
    return summary, scores


def report_cards(data: ReportData, scores: dict[str, dict[str, float]], image_dir: str | None) -> list:
    """One report.Card per image shown, with its thumbnail when image_dir holds it."""
    import report

    paths = dict(images.list_images(image_dir)) if image_dir else {}
    if image_dir and not set(data.ids) & paths.keys():
        errors.log(f"warning: no image in {image_dir} has a ground-truth ID; the cards have no thumbnails")
    return [report.Card(
        image_id=i,
        image_path=paths.get(i),
        gt_caption=data.captions_gt.get(i),
        pred_caption=data.captions_pred.get(i, "") if i in data.captions_gt else None,
        gt_cuis=data.concepts_gt.get(i),
        pred_cuis=data.concepts_pred.get(i, ()) if i in data.concepts_gt else None,
        scores=scores[i],
        methods={name: pred.get(i, ()) for name, pred in data.methods.items()} if i in data.concepts_gt else {},
    ) for i in data.ids]


def run_report(args: argparse.Namespace) -> int:
    """`report`: the official scores and one card per ground-truth image, written as one HTML page."""
    import report

    check_report_options(args)
    data = read_report_data(args)
    summary, scores = report_scores(args, data)
    cards = report_cards(data, scores, args.image_dir)
    title = args.title or "Error analysis: " + ", ".join(Path(p).name for p in (args.concepts_pred,
                                                                               args.captions_pred) if p)
    out = report.write_report(args.out, title=title, summary=summary, cards=cards, cui_names=data.cui_names)
    errors.log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(cards):,} images)")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main, hint=""))
