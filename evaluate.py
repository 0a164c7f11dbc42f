"""Official ImageCLEFmedical Caption scores and submission checks, run locally.

    python evaluate.py concepts --gt valid_concepts.csv --pred results/concepts.csv \
        --gt_manual valid_concepts_manual.csv
    python evaluate.py captions --gt valid_captions.csv --pred results/captions.csv [--bertscore_model DIR]
    python evaluate.py validate --task concepts --pred results/concepts.csv --ids test_images/

Concept F1 follows the official evaluator exactly, including how its reader turns a row into
concepts: `ID` alone is no concept, `ID,` is the one empty concept '', `C1;` adds '' as a concept.
Caption metrics use the official preprocessing; only metrics that run offline are computed, and a
metric whose model is not available is skipped and said so, never estimated.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import errors
import files
from images import list_images

# The 2025 secondary-score list: imaging modalities and body regions.
ALLOWED_CUIS_2025 = (
    "C0002978", "C0040405", "C0024485", "C0032743", "C0041618", "C1306645", "C0920367",
    "C1140618", "C0037949", "C0030797", "C0023216", "C0037303", "C0817096", "C0006141", "C0000726",
)
MAX_CONCEPTS = 100
CUI_SHAPE = re.compile(r"^C\d{7}$")


# ---------------------------------------------------------------------------------------------
# Reading files the way the official evaluator does
# ---------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every CSV record; a file that is not UTF-8 is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise errors.UserError(f"{path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            rows = []
            for fields in reader:
                rows.append((reader.line_num, fields))
            return rows
    except UnicodeDecodeError as e:
        raise errors.UserError(f"{path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise errors.UserError(f"{path} is not a readable CSV: {e}") from None


def is_header(fields: list[str]) -> bool:
    return bool(fields) and "ID" in fields[0]  # the official reader's rule, for any row


def concept_pairs(rows: list[tuple[int, list[str]]]) -> dict[str, tuple[str, ...]]:
    """ID -> concepts, as the official reader builds them (empty items kept, not yet upper-cased)."""
    pairs: dict[str, tuple[str, ...]] = {}
    for _, fields in rows:
        if not fields or is_header(fields) or len(fields) > 2:
            continue
        pairs[fields[0]] = tuple(c.strip() for c in fields[1].split(";")) if len(fields) == 2 else ()
    return pairs


def caption_pairs(rows: list[tuple[int, list[str]]]) -> dict[str, str]:
    """ID -> caption: the second field, as the official reader keeps it."""
    return {fields[0]: fields[1] for _, fields in rows if len(fields) >= 2 and not is_header(fields)}


def expected_ids(source: str | Path) -> list[str]:
    """Image IDs from a ground-truth/ID CSV (first column) or from an image folder (file stems)."""
    source = Path(source)
    if source.is_dir():
        return [i for i, _ in list_images(source)]
    return [fields[0] for _, fields in read_rows(source) if fields and not is_header(fields)]


# ---------------------------------------------------------------------------------------------
# Validation: every rule the platform rejects on, all violations, with line numbers
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)  # the platform would reject the file
    warnings: list[str] = field(default_factory=list)  # accepted, but probably not what you meant

    @property
    def accepted(self) -> bool:
        return not self.errors


def check_ids(rows: list[tuple[int, list[str]]], expected: list[str] | None, report: Report) -> None:
    seen: dict[str, int] = {}
    expected_set = set(expected or [])
    for line, fields in rows:
        if not fields or is_header(fields):
            continue
        image_id = fields[0]
        if image_id in seen:
            report.errors.append(f"line {line}: duplicate image ID {image_id!r} (first on line {seen[image_id]})")
            continue
        seen[image_id] = line
        if expected is not None and image_id not in expected_set:
            report.errors.append(f"line {line}: unknown image ID {image_id!r}")
    if expected is None:
        return
    missing = [i for i in expected if i not in seen]
    header_like = [i for i in missing if "ID" in i]
    if header_like:
        report.errors.append(f"{len(header_like)} image IDs contain 'ID', so the evaluator skips their rows as "
                             f"headers: {', '.join(header_like[:5])}")
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        report.errors.append(f"{len(seen)} image IDs but the test set has {len(expected)}: {len(missing)} missing "
                             f"({shown})")


def data_rows(rows: list[tuple[int, list[str]]], report: Report) -> Iterator[tuple[int, list[str]]]:
    """The rows the evaluator reads as data: blank lines are reported, header-like rows skipped."""
    for line, fields in rows:
        if not fields:
            report.errors.append(f"line {line}: blank line")
        elif not is_header(fields):
            yield line, fields


def validate_concepts(rows: list[tuple[int, list[str]]], expected: list[str] | None) -> Report:
    report = Report()
    for line, fields in data_rows(rows, report):
        if len(fields) > 2:
            report.errors.append(f"line {line}: {len(fields)} fields; a row is ID or ID,CUI;CUI;... "
                                 "(separate CUIs with ';', not ',')")
            continue
        if len(fields) == 1:
            continue
        concepts = [c.strip() for c in fields[1].split(";")]
        named = [c for c in concepts if c]
        if len(concepts) > MAX_CONCEPTS:
            report.errors.append(f"line {line}: {len(concepts)} concepts for {fields[0]!r}; at most {MAX_CONCEPTS}")
        dupes = sorted({c for c in named if named.count(c) > 1})
        if dupes:
            report.errors.append(f"line {line}: concept repeated for {fields[0]!r}: {', '.join(dupes)}")
        if len({c.upper() for c in named}) < len(set(named)):
            report.warnings.append(f"line {line}: the same CUI in two letter cases for {fields[0]!r}")
        if named and len(named) < len(concepts):
            report.warnings.append(f"line {line}: empty item (a stray ';') for {fields[0]!r} counts as a wrong "
                                   "concept")
        odd = [c for c in named if not CUI_SHAPE.match(c.upper())]
        if odd:
            report.warnings.append(f"line {line}: not shaped like a CUI (C + 7 digits): {', '.join(odd[:5])}")
    check_ids(rows, expected, report)
    return report


def validate_captions(rows: list[tuple[int, list[str]]], expected: list[str] | None) -> Report:
    report = Report()
    if not rows or [f.strip() for f in rows[0][1]] != ["ID", "Caption"]:
        report.errors.append("line 1: the header row must be ID,Caption")
    for line, fields in data_rows(rows, report):
        if len(fields) < 2:
            report.errors.append(f"line {line}: no caption field for {fields[0]!r}")
        elif len(fields) > 2:
            report.warnings.append(f"line {line}: {len(fields)} fields; only the text before the first unquoted "
                                   "comma is scored (quote captions that contain commas)")
        elif not fields[1].strip():
            report.warnings.append(f"line {line}: empty caption for {fields[0]!r}")
    check_ids(rows, expected, report)
    return report


def validate_file(task: str, pred: str | Path, expected: list[str] | None) -> Report:
    rows = read_rows(pred)
    return validate_concepts(rows, expected) if task == "concepts" else validate_captions(rows, expected)


def log_report(report: Report, name: str, limit: int = 50) -> None:
    verdict = "accepted" if report.accepted else f"REJECTED ({len(report.errors)} problems)"
    lines = [f"{name}: the official checks say {verdict}"]
    lines += [f"  error: {e}" for e in report.errors[:limit]]
    if len(report.errors) > limit:
        lines.append(f"  ... and {len(report.errors) - limit} more errors")
    lines += [f"  warning: {w}" for w in report.warnings[:limit]]
    if len(report.warnings) > limit:
        lines.append(f"  ... and {len(report.warnings) - limit} more warnings")
    errors.log("\n".join(lines))


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


def caption_scores(gt: dict[str, str], pred: dict[str, str], bertscore_model: str | None = None,
                   bertscore_layers: int | None = None) -> tuple[dict, list[dict]]:
    ids = list(gt)
    gts = [preprocess_caption(gt[i]) for i in ids]
    preds = [preprocess_caption(pred.get(i, "")) for i in ids]
    rouge = rouge1_scores(gts, preds)
    summary: dict = {"images_scored": len(ids), "rouge1": sum(rouge) / max(len(ids), 1), **bleu_scores(gts, preds)}
    rows = [{"ID": i, "rouge1": r} for i, r in zip(ids, rouge, strict=True)]
    if bertscore_model:
        bert = bertscore_f1(gts, preds, bertscore_model, bertscore_layers)
        summary["bertscore_f1"] = sum(bert) / max(len(ids), 1)
        for row, b in zip(rows, bert, strict=True):
            row["bertscore_f1"] = b
    else:
        summary["skipped"] = ["bertscore_f1 (give --bertscore_model, a local microsoft/deberta-xlarge-mnli folder)",
                              "MedImageInsight similarity, UMLS-concept F1 (MedCAT), AlignScore: need models "
                              "this tool does not ship"]
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
        else:
            print(f"  {key:<24}{value:.4f}" if isinstance(value, float) else f"  {key:<24}{value}")
    print(f"  {'submission check':<24}{'accepted' if report.accepted else 'REJECTED, see above'}")


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
    k = sub.add_parser("captions", help="caption scores that run offline: ROUGE-1, BLEU-1/4, BERTScore")
    k.add_argument("--gt", required=True, help="ground truth, ID,Caption")
    k.add_argument("--pred", required=True, help="your submission, ID,Caption")
    k.add_argument("--bertscore_model", help="local folder of microsoft/deberta-xlarge-mnli for BERTScore")
    k.add_argument("--bertscore_layers", type=int, help="layer bert-score uses (known models: automatic)")
    v = sub.add_parser("validate", help="check a submission against every rule the platform rejects on")
    v.add_argument("--task", choices=["concepts", "captions"], required=True)
    v.add_argument("--pred", required=True, help="the submission file")
    ids = v.add_mutually_exclusive_group()
    ids.add_argument("--gt", help="ground-truth CSV whose first column lists the expected IDs")
    ids.add_argument("--ids", help="CSV of expected IDs (first column) or a folder of the test images")
    for p in (c, k, v):
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return run_report(args)
    if args.command == "validate":
        expected = expected_ids(args.gt or args.ids) if (args.gt or args.ids) else None
        report = validate_file(args.task, args.pred, expected)
        if args.json:
            print(json.dumps({"accepted": report.accepted, "errors": report.errors, "warnings": report.warnings},
                             indent=2))
        else:
            log_report(report, args.pred)
        return 0 if report.accepted else 1
    gt_rows, pred_rows = read_rows(args.gt), read_rows(args.pred)
    if args.command == "concepts":
        report = validate_concepts(pred_rows, [f[0] for _, f in gt_rows if f and not is_header(f)])
        manual = concept_pairs(read_rows(args.gt_manual)) if args.gt_manual else None
        summary, rows = concept_scores(concept_pairs(gt_rows), concept_pairs(pred_rows), manual,
                                       allowed_list(args.allowed_cuis))
    else:
        report = validate_captions(pred_rows, [f[0] for _, f in gt_rows if f and not is_header(f)])
        summary, rows = caption_scores(caption_pairs(gt_rows), caption_pairs(pred_rows), args.bertscore_model,
                                       args.bertscore_layers)
    if args.per_image:
        write_per_image(args.per_image, rows)
    if args.json:
        print(json.dumps({**summary, "accepted": report.accepted, "errors": report.errors,
                          "warnings": report.warnings}, indent=2))
    else:
        if not report.accepted or report.warnings:
            log_report(report, args.pred, limit=10)
        print_summary(f"{args.command}: {args.pred} vs {args.gt}", summary, report)
    return 0


def run_report(args: argparse.Namespace) -> int:
    """`report`: the official scores and one card per ground-truth image, written as one HTML page."""
    import report
    from cui_mapper import CuiMapper
    from images import id_sort_key

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

    c_gt_rows = read_rows(args.concepts_gt) if concepts else []
    c_pred_rows = read_rows(args.concepts_pred) if concepts else []
    k_gt_rows = read_rows(args.captions_gt) if captions else []
    k_pred_rows = read_rows(args.captions_pred) if captions else []
    c_gt, c_pred = concept_pairs(c_gt_rows), concept_pairs(c_pred_rows)
    k_gt, k_pred = caption_pairs(k_gt_rows), caption_pairs(k_pred_rows)
    all_ids = sorted(dict.fromkeys([*c_gt, *k_gt]), key=id_sort_key)
    ids = all_ids[:args.limit] if args.limit else all_ids
    keep = set(ids)
    scores: dict[str, dict[str, float]] = {i: {} for i in ids}
    summary: dict = {"run": {"images": len(ids) if len(ids) == len(all_ids) else f"first {len(ids):,} of "
                             f"{len(all_ids):,} (--limit)"}}

    def check(report_: Report) -> str:
        if args.limit:
            return "not run with --limit"
        problems = f"REJECTED ({len(report_.errors)} problems, listed by the validate command)"
        return "accepted" if report_.accepted else problems

    if concepts:
        summary["run"]["concepts"] = f"{args.concepts_pred} vs {args.concepts_gt}"
        gt = {i: c for i, c in c_gt.items() if i in keep}
        manual = ({i: c for i, c in concept_pairs(read_rows(args.gt_manual)).items() if i in keep}
                  if args.gt_manual else None)
        concept_summary, rows = concept_scores(gt, c_pred, manual, allowed_list(args.allowed_cuis))
        for name, pred in methods.items():
            method_summary, method_rows = concept_scores(gt, pred)
            concept_summary[f"f1 {name}"] = method_summary["f1"]
            rows += [{"ID": r["ID"], f"f1 {name}": r["f1"]} for r in method_rows]
        verdict = check(validate_concepts(c_pred_rows, [f[0] for _, f in c_gt_rows if f and not is_header(f)]))
        summary["concepts"] = {**concept_summary, "submission check": verdict}
        for row in rows:
            scores[row["ID"]].update({k: v for k, v in row.items() if isinstance(v, float)})
    if captions:
        summary["run"]["captions"] = f"{args.captions_pred} vs {args.captions_gt}"
        caption_summary, rows = caption_scores({i: c for i, c in k_gt.items() if i in keep}, k_pred,
                                               args.bertscore_model, args.bertscore_layers)
        verdict = check(validate_captions(k_pred_rows, [f[0] for _, f in k_gt_rows if f and not is_header(f)]))
        summary["captions"] = {**caption_summary, "submission check": verdict}
        for row in rows:
            scores[row["ID"]].update({k: v for k, v in row.items() if isinstance(v, float)})

    paths = dict(list_images(args.image_dir)) if args.image_dir else {}
    if args.image_dir and not keep & paths.keys():
        errors.log(f"warning: no image in {args.image_dir} has a ground-truth ID; the cards have no thumbnails")
    cards = [report.Card(
        image_id=i,
        image_path=paths.get(i),
        gt_caption=k_gt.get(i),
        pred_caption=k_pred.get(i, "") if i in k_gt else None,
        gt_cuis=c_gt.get(i),
        pred_cuis=c_pred.get(i, ()) if i in c_gt else None,
        scores=scores[i],
        methods={name: pred.get(i, ()) for name, pred in methods.items()} if i in c_gt else {},
    ) for i in ids]
    title = args.title or "Error analysis: " + ", ".join(Path(p).name for p in (args.concepts_pred,
                                                                               args.captions_pred) if p)
    out = report.write_report(args.out, title=title, summary=summary, cards=cards, cui_names=cui_names)
    errors.log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(cards):,} images)")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
