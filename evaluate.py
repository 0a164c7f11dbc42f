"""Score and check ImageCLEFmedical Caption submissions from the command line: the scores live in
scores.py, the organisers' file rules in submission.py, the error-analysis page in report.py.

    python evaluate.py concepts --gt valid_concepts.csv --pred results/concepts.csv \
        --gt_manual valid_concepts_manual.csv
    python evaluate.py captions --gt valid_captions.csv --pred results/captions.csv \
        [--bertscore_model DIR] [--bleurt_model DIR]
    python evaluate.py validate --task concepts --pred results/concepts.csv --ids ids.csv --zip upload.zip
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from jjvmed import errors, files, images
from jjvmed.scores import ALLOWED_CUIS_2025, caption_scores, concept_scores
from jjvmed.submission import (
    RULES,
    Report,
    caption_pairs,
    concept_pairs,
    log_report,
    read_id_list,
    read_rows,
    validate_file,
    write_zip,
)

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
    report = validate_file(args.task, args.pred, args.ids, args.rules, ground_truth=args.gt)
    written = write_zip(args.pred, args.zip) if args.zip and report.accepted else None
    if args.json:
        print(json.dumps({"accepted": report.accepted, "rules": report.rules, "errors": report.errors,
                          "warnings": report.warnings, "zip": str(written) if written else None}, indent=2))
    else:
        log_report(report, args.pred)
        if not (args.gt or args.ids):
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
    from jjvmed.cui_mapper import CuiMapper

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
    from jjvmed import report

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
    from jjvmed import report

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
