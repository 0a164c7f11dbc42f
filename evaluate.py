"""Score and check ImageCLEFmedical Caption submissions from the command line: the scores live in
scores.py, the organisers' file rules in submission.py, the error-analysis page in report.py.

    python evaluate.py concepts --gt valid_concepts.csv --pred results/concepts.csv \
        --gt_manual valid_concepts_manual.csv
    python evaluate.py captions --gt valid_captions.csv --pred results/captions.csv \
        [--bertscore_model DIR] [--bleurt_model DIR]
    python evaluate.py validate --task concepts --pred results/concepts.csv --ids_csv ids.csv --zip upload.zip
    python evaluate.py report --output_html report.html --gt valid_concepts.csv --pred results/concepts.csv \
        --gt valid_captions.csv --pred results/captions.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from jjvmed import errors, files, images
from jjvmed.options import Parser
from jjvmed.scores import ALLOWED_CUIS_2025, caption_scores, concept_scores, describe_partial
from jjvmed.submission import (
    CUI_SHAPE,
    RULES,
    TASKS,
    Report,
    Rows,
    caption_pairs,
    concept_pairs,
    is_header,
    log_report,
    read_id_list,
    read_rows,
    validate_file,
    write_zip,
)

DEFAULT_CUI_NAMES = Path(__file__).resolve().parent / "data" / "cui_names.csv"

# ---------------------------------------------------------------------------------------------
# Which file is which: a file of the other task is refused; signs of a swapped --gt/--pred are warned
# ---------------------------------------------------------------------------------------------

# What a header's second column says the file holds. `Concepts` is format A, the natural-language names.
KIND_BY_COLUMN = {"cuis": "concepts", "cui": "concepts", "caption": "captions", "captions": "captions",
                  "concepts": "concept names"}
KIND_WORDS = {"concepts": "a concepts file", "captions": "a captions file",
              "concept names": "format A, concept names rather than CUIs"}
CUI_LIST = re.compile(r"\s*C\d+\s*(;\s*(C\d+\s*)?)*", re.IGNORECASE)  # CUIs, allowing a prediction's slips
SNIFF_ROWS = 2_000  # rows looked at to judge a file without a header
# The likelihood signs below need this many images on both sides before they speak.
MIN_IMAGES_FOR_SIGNS = 50
# A released ground truth rarely repeats a caption (ROCO validation: 0.5% of rows); a model's greedy
# captions often do.
REPEATED_CAPTIONS_SIGN = 0.2
# A model predicts from fewer distinct CUIs than the ground truth uses (JJ-VMed's 2025 test run used 755;
# that year's task has 2,479).
VOCABULARY_RATIO_SIGN = 2


def file_kind(rows: Rows) -> tuple[str | None, str]:
    """(what a CSV holds: concepts / captions / concept names, or None when it cannot tell; the evidence).

    The header decides when it names its column; a file without one is judged by its values: all of
    them CUI lists is a concepts file, none of them is text.
    """
    if rows and rows[0][1]:
        header = [f.strip().lstrip("\ufeff") for f in rows[0][1]]
        if header[0].upper() == "ID" and len(header) > 1 and header[1].lower() in KIND_BY_COLUMN:
            return KIND_BY_COLUMN[header[1].lower()], f"header {','.join(header)}"
    values = [fields[1] for _, fields in rows[:SNIFF_ROWS]
              if len(fields) == 2 and fields[1].strip() and not is_header(fields)]
    cui_lists = sum(1 for v in values if CUI_LIST.fullmatch(v))
    if values and cui_lists == len(values):
        return "concepts", "no header; its values are CUIs"
    if values and cui_lists == 0:
        return "captions", "no header; its values are text, not CUIs"
    return None, "no header"


def header_kind(path: str) -> tuple[str | None, str]:
    """file_kind() judged by the first line alone, read leniently: the pre-check reports what else is wrong."""
    with open(path, "rb") as fh:
        first = fh.readline().decode("utf-8-sig", errors="replace")
    fields = next(csv.reader([first]), [])
    kind, evidence = file_kind([(1, fields)])
    return (kind, evidence) if evidence.startswith("header") else (None, "no header")


def described(option: str, path: str, rows: Rows) -> str:
    kind, evidence = file_kind(rows)
    return f"{option} {path} looks like {KIND_WORDS[kind] if kind else 'neither'} ({evidence})"


def check_task(task: str, named: list[tuple[str, str, Rows]]) -> None:
    """A file holding another task's data is a one-line error saying what each given file looks like."""
    kinds = [file_kind(rows)[0] for _, _, rows in named]
    if all(kind in (task, None) for kind in kinds):
        return
    other = "concepts" if task == "captions" else "captions"
    hint = ""
    if all(kind == other for kind in kinds):
        hint = f": run `evaluate.py {other}`"
    elif "concept names" in kinds:
        hint = ": score the ID,CUIs file that was written beside it"
    raise errors.UserError(f"`{task}` compares two {task} files, but " + "; ".join(
        described(option, path, rows) for option, path, rows in named) + hint)


def data_ids(rows: Rows) -> list[str]:
    return [fields[0] for _, fields in rows if fields and not is_header(fields)]


def swap_signs(task: str, gt_path: str, gt_rows: Rows, pred_path: str, pred_rows: Rows) -> list[str]:
    """Signs that --gt is a prediction and --pred the ground truth, each one line; only likelihoods, so
    the caller warns and scores anyway."""
    question = "are --gt and --pred swapped?"
    signs = []
    gt_ids, pred_ids = set(data_ids(gt_rows)), set(data_ids(pred_rows))
    if gt_ids and gt_ids < pred_ids:
        signs.append(f"--gt {gt_path} names {len(gt_ids):,} images, all of them also in --pred {pred_path}, which "
                     f"names {len(pred_ids):,}: a ground truth names every image, a trial run only some; {question}")
    if task == "concepts":
        gt, pred = concept_pairs(gt_rows), concept_pairs(pred_rows)
        slips = Counter()
        for concepts in gt.values():
            slips["rows without a CUIs field"] += not concepts
            slips["stray ';'"] += "" in concepts and concepts != ("",)
            slips["lower-case CUIs"] += any(c != c.upper() for c in concepts)
        found = [f"{n:,} {what}" for what, n in slips.items() if n]
        if found:
            signs.append(f"--gt {gt_path} has what a released ground truth does not ({', '.join(found)}): it looks "
                         f"like a prediction; {question}")
        gt_vocabulary = {c.upper() for cs in gt.values() for c in cs if c}
        pred_vocabulary = {c.upper() for cs in pred.values() for c in cs if c}
        if (min(len(gt), len(pred)) >= MIN_IMAGES_FOR_SIGNS and pred_vocabulary
                and len(gt_vocabulary) * VOCABULARY_RATIO_SIGN <= len(pred_vocabulary)):
            signs.append(f"--gt {gt_path} uses {len(gt_vocabulary):,} distinct CUIs, --pred {pred_path} "
                         f"{len(pred_vocabulary):,}: predictions usually draw on fewer than the ground truth; "
                         f"{question}")
    else:
        shares = []
        for rows in (gt_rows, pred_rows):
            texts = [t.strip() for t in caption_pairs(rows).values() if t.strip()]
            counts = Counter(texts)
            shares.append((sum(1 for t in texts if counts[t] > 1) / len(texts) if texts else 0.0, len(texts)))
        (gt_share, gt_n), (pred_share, pred_n) = shares
        if (min(gt_n, pred_n) >= MIN_IMAGES_FOR_SIGNS and gt_share >= REPEATED_CAPTIONS_SIGN
                and gt_share >= 2 * pred_share):
            signs.append(f"--gt {gt_path} repeats a caption on {gt_share:.0%} of its images, --pred {pred_path} "
                         f"on {pred_share:.0%}: a model's captions repeat, a ground truth's rarely do; {question}")
    return signs


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

RULES_HELP = "which edition's submission rules to check (default 2026; 2025 reads older files the lenient way)"


def add_bertscore_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bertscore_model", metavar="DIR",
                   help="local folder of microsoft/deberta-xlarge-mnli for BERTScore (default: skipped)")
    p.add_argument("--bertscore_layers", type=int, metavar="N",
                   help="layer bert-score uses (for models it knows by name: automatic)")


def add_bleurt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bleurt_model", metavar="DIR",
                   help="local folder of lucadiliello/BLEURT-20-D12 for BLEURT (default: skipped)")
    p.add_argument("--bleurt_batch_size", type=int, default=8, metavar="N",
                   help="pairs per BLEURT batch (default 8, as the organisers)")


def add_manual_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gt_manual", metavar="CSV", help="manual ground truth (ID,CUIs) for the secondary F1")
    p.add_argument("--allowed_cuis", metavar="FILE_OR_LIST",
                   help="CUIs counted by the secondary F1: a file with one per line or a comma/semicolon-separated "
                   "list (default: the 2025 list of modalities and body regions)")


def build_parser() -> Parser:
    parser = Parser(description="Score and check ImageCLEFmedical Caption submissions locally, with the official "
                    "definitions. Exit codes: 0 the file would be accepted, 1 rejected (scores are printed either "
                    "way), 2 a usage error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("concepts", help="primary (and secondary) concept-detection F1",
                       description="Concept detection: the primary F1 exactly as the official evaluator computes it "
                       "and, with --gt_manual, the secondary F1; then the 2026 pre-check of --pred against the "
                       "ground truth's IDs and order.")
    c.add_argument("--gt", required=True, metavar="CSV", help="the ground truth, ID,CUIs")
    c.add_argument("--pred", required=True, metavar="CSV", help="your run, ID,CUIs")
    add_manual_options(c)

    k = sub.add_parser("captions", help="caption scores that run offline: ROUGE-1, BLEU-1/4, BERTScore, BLEURT",
                       description="Caption prediction: the scores that run offline on the official preprocessing "
                       "(ROUGE-1, BLEU-1/4; BERTScore and BLEURT from local model folders), the 2026 relevance and "
                       "factuality marked partial where a part cannot run; then the 2026 pre-check of --pred "
                       "against the ground truth's IDs and order.")
    k.add_argument("--gt", required=True, metavar="CSV", help="the ground truth, ID,Caption")
    k.add_argument("--pred", required=True, metavar="CSV", help="your run, ID,Caption")
    add_bertscore_options(k)
    add_bleurt_options(k)

    v = sub.add_parser("validate", help="check a submission against every rule the platform rejects on",
                       description="Check a submission file against every rule of the 2026 pre-check the upload "
                       "platform runs (all problems, with line numbers) and, with --zip, write the upload when it "
                       "passes.")
    v.add_argument("--task", choices=TASKS, required=True,
                   help="the file's task: concepts (ID,CUIs) or captions (ID,Caption)")
    v.add_argument("--pred", required=True, metavar="CSV", help="the submission file")
    ids = v.add_mutually_exclusive_group()
    ids.add_argument("--ids_csv", metavar="CSV_OR_DIR", help="the organisers' ids.csv (first column, in order) or "
                     "a folder of the test images (natural order)")
    ids.add_argument("--gt", metavar="CSV", help="a ground-truth CSV whose first column lists the expected IDs, "
                     "in order")
    v.add_argument("--zip", metavar="ZIP", help="write the upload zip (only submission.csv inside) here if the file "
                   "is accepted")
    v.rename("--ids", "--ids_csv")

    for p in (c, k, v):
        p.add_argument("--rules", choices=RULES, default="2026", help=RULES_HELP)
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    for p in (c, k):
        p.add_argument("--per_image", metavar="CSV", help="write each image's scores to this CSV")

    r = sub.add_parser("report", help="error analysis: one self-contained HTML page with the scores, a per-CUI "
                       "table and a card per image",
                       description="Error analysis: one self-contained HTML page with the scores, a per-CUI table "
                       "and a card per ground-truth image (thumbnail, both captions, concepts marked hit, missed or "
                       "wrong). Give --gt and --pred once per task: each file's task is read from its header "
                       "(ID,CUIs or ID,Caption), so one page can show concepts and captions together.")
    r.add_argument("--output_html", required=True, metavar="HTML", help="the HTML file to write")
    r.add_argument("--gt", action="append", default=[], metavar="CSV",
                   help="a ground truth, ID,CUIs or ID,Caption (repeatable: one per task)")
    r.add_argument("--pred", action="append", default=[], metavar="CSV",
                   help="your run for the same task, ID,CUIs or ID,Caption (repeatable: one per task)")
    r.add_argument("--image_dir", metavar="DIR", help="folder of the images, for the cards' thumbnails")
    add_manual_options(r)
    r.add_argument("--concepts_method", action="append", metavar="NAME=CSV", help="another concept method's ID,CUIs "
                   "file, shown and scored on each card beside the concepts --pred (repeatable)")
    add_bertscore_options(r)
    add_bleurt_options(r)
    r.add_argument("--cui_mapping_file", default=str(DEFAULT_CUI_NAMES), metavar="CSV",
                   help="names shown beside the CUIs: CUI plus a name column (default: data/cui_names.csv)")
    r.add_argument("--title", help="the page's title (default: from the runs' file names)")
    r.add_argument("--limit", type=int, metavar="N", help="only the first N ground-truth images, in ID order")
    r.rename("--out", "--output_html")
    for task in TASKS:  # the task now comes from each file's header
        r.rename(f"--{task}_gt", "--gt")
        r.rename(f"--{task}_pred", "--pred")
    return parser


def allowed_list(value: str | None) -> tuple[str, ...]:
    """--allowed_cuis: a file of CUIs (one per line; a header `CUI` is skipped) or a list of CUIs. Anything that
    is not a CUI is refused: a mistyped path read as a list would filter every CUI out, and the secondary F1
    would be 0."""
    if not value:
        return ALLOWED_CUIS_2025
    is_file = Path(value).is_file()
    try:
        text = Path(value).read_text(encoding="utf-8") if is_file else value
    except UnicodeDecodeError:
        raise errors.UserError(f"--allowed_cuis {value} is not UTF-8; save it as UTF-8") from None
    items = [c.strip() for c in re.split(r"[\s,;]+", text) if c.strip() and c.strip().upper() != "CUI"]
    wrong = [c for c in items if not CUI_SHAPE.match(c.upper())]
    if wrong and not is_file:
        raise errors.UserError(f"--allowed_cuis {value} is neither a file nor a list of CUIs ({wrong[0]!r} is not "
                               "a CUI, C followed by 7 digits)")
    if wrong:
        raise errors.UserError(f"--allowed_cuis {value} holds {wrong[0]!r}, which is not a CUI; give one CUI per line")
    if not items:
        raise errors.UserError(f"--allowed_cuis {value} lists no CUIs")
    return tuple(c.upper() for c in items)


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
            result = "" if value["value"] is None else f"  {value['value']:.4f}  not the official score"
            print(f"  {name} ({describe_partial(value)}){result}")
        else:
            print(f"  {key:<24}{value:.4f}" if isinstance(value, float) else f"  {key:<24}{value}")
    print(f"  {'submission check':<24}{'accepted' if report.accepted else 'REJECTED, see above'} "
          f"({report.rules} rules)")


def validate(args: argparse.Namespace) -> int:
    if args.zip and not (args.gt or args.ids_csv):
        raise errors.UserError("--zip needs --ids_csv or --gt: checked against nothing but its own rows, a file "
                               "could lack IDs or have them out of order; give --ids_csv with the test set's ID list")
    if args.zip and args.rules != "2026":
        raise errors.UserError("--zip checks with the 2026 rules, the platform's; leave out --rules 2025")
    # Only the header is trusted here: a file without one is still a submission to list the problems of.
    kind, evidence = header_kind(args.pred) if Path(args.pred).is_file() else (None, "")
    if kind not in (args.task, None):
        hint = f"give --task {kind}" if kind in TASKS else "check the ID,CUIs file that was written beside it"
        raise errors.UserError(f"--task {args.task}, but --pred {args.pred} looks like {KIND_WORDS[kind]} "
                               f"({evidence}): {hint}")
    report = validate_file(args.task, args.pred, args.ids_csv, args.rules, ground_truth=args.gt)
    written = write_zip(args.pred, args.zip) if args.zip and report.accepted else None
    if args.json:
        print(json.dumps({"accepted": report.accepted, "rules": report.rules, "errors": report.errors,
                          "warnings": report.warnings, "zip": str(written) if written else None}, indent=2))
    else:
        log_report(report, args.pred)
        if not (args.gt or args.ids_csv):
            errors.log("  note: checked against its own rows only; give --ids_csv to check against the test set's "
                       "ID list")
    if written:
        errors.log(f"wrote {written} (submission.csv inside): upload this file")
    elif args.zip:
        stale = f" ({args.zip} is from an earlier run: do not upload it)" if Path(args.zip).exists() else ""
        errors.log(f"no zip written: {args.pred} is REJECTED; fix the errors above and run again{stale}")
    return 0 if report.accepted else 1


def score(args: argparse.Namespace) -> int:
    """`concepts` and `captions`: the scores, then the pre-check against the ground truth's IDs and order."""
    gt_rows, pred_rows = read_rows(args.gt), read_rows(args.pred)
    manual_rows = read_rows(args.gt_manual) if args.command == "concepts" and args.gt_manual else None
    check_task(args.command, [("--gt", args.gt, gt_rows), ("--pred", args.pred, pred_rows)]
               + ([("--gt_manual", args.gt_manual, manual_rows)] if manual_rows is not None else []))
    signs = swap_signs(args.command, args.gt, gt_rows, args.pred, pred_rows)
    for sign in signs:
        errors.log(f"warning: {sign}")
    expected = read_id_list(args.gt)  # the ground truth's order is the order the platform wants
    if args.command == "concepts":
        manual = concept_pairs(manual_rows) if manual_rows is not None else None
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
                          "warnings": report.warnings, "input_warnings": signs}, indent=2))
    else:
        if not report.accepted or report.warnings:
            log_report(report, args.pred, limit=10)
        print_summary(f"{args.command}: {args.pred} vs {args.gt}", summary, report)
    return 0 if report.accepted else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return run_report(args)
    if args.command == "validate":
        return validate(args)
    return score(args)


# ---------------------------------------------------------------------------------------------
# The report, step by step: pair the files by task, read them, score, one card per image, write the page
# ---------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One task's ground truth and run, as given and as read."""

    gt: str
    pred: str
    gt_rows: Rows
    pred_rows: Rows


def report_pairs(gt_paths: list[str], pred_paths: list[str]) -> dict[str, Pair]:
    """task -> its (ground truth, run), each file's task read from its header (or values)."""
    found: dict[tuple[str, str], tuple[str, Rows]] = {}
    for option, paths in (("--gt", gt_paths), ("--pred", pred_paths)):
        for path in paths:
            rows = read_rows(path)
            kind, evidence = file_kind(rows)
            if kind not in TASKS:
                what = f"looks like {KIND_WORDS[kind]}" if kind else "cannot be told to hold concepts or captions"
                raise errors.UserError(f"{option} {path} {what} ({evidence}); the report reads each file's task from "
                                       "its header: ID,CUIs or ID,Caption")
            if (option, kind) in found:
                raise errors.UserError(f"two {option} files hold {kind}: {found[option, kind][0]} and {path}; give "
                                       "one per task")
            found[option, kind] = (path, rows)
    if not found:
        raise errors.UserError("report needs --gt and --pred: a ground truth and your run, for concepts, captions or "
                               "both")
    pairs = {}
    for task in TASKS:
        gt, pred = found.get(("--gt", task)), found.get(("--pred", task))
        if bool(gt) != bool(pred):
            given, missing = ("--gt", "--pred") if gt else ("--pred", "--gt")
            raise errors.UserError(f"{given} {(gt or pred)[0]} holds {task}, but no {missing} does: give both the "
                                   f"{task} ground truth and your {task} run")
        if gt and pred:
            pairs[task] = Pair(gt[0], pred[0], gt[1], pred[1])
    return pairs


def check_report_options(args: argparse.Namespace, pairs: dict[str, Pair]) -> None:
    if (args.gt_manual or args.concepts_method) and "concepts" not in pairs:
        raise errors.UserError("--gt_manual and --concepts_method need the concepts --gt and --pred")
    if args.limit is not None and args.limit < 1:
        raise errors.UserError(f"--limit must be at least 1, not {args.limit}")


@dataclass
class ReportData:
    """What the report shows, as read from the files (a task not given reads as empty)."""

    concepts_gt: dict[str, tuple[str, ...]]
    concepts_pred: dict[str, tuple[str, ...]]
    captions_gt: dict[str, str]
    captions_pred: dict[str, str]
    methods: dict[str, dict[str, tuple[str, ...]]]  # --concepts_method NAME -> its concepts by ID
    cui_names: dict[str, str]
    ids: list[str]  # the images shown: the ground truth's IDs in natural order, the first --limit of them
    ground_truth_images: int  # all of them


def read_report_data(args: argparse.Namespace, pairs: dict[str, Pair]) -> ReportData:
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
    concepts, captions = pairs.get("concepts"), pairs.get("captions")
    c_gt = concept_pairs(concepts.gt_rows) if concepts else {}
    k_gt = caption_pairs(captions.gt_rows) if captions else {}
    all_ids = sorted(dict.fromkeys([*c_gt, *k_gt]), key=images.id_sort_key)
    return ReportData(c_gt, concept_pairs(concepts.pred_rows) if concepts else {}, k_gt,
                      caption_pairs(captions.pred_rows) if captions else {}, methods, cui_names,
                      all_ids[:args.limit] if args.limit else all_ids, len(all_ids))


def submission_verdict(report: Report, limited: bool) -> str:
    if limited:
        return "not run with --limit"
    count = len(report.errors)
    return "accepted" if report.accepted else (f"REJECTED ({count} problem{'s' if count != 1 else ''}, listed by "
                                               "the validate command)")


def readable(summary: dict) -> dict:
    """The summary as the page shows it: a partial aggregate as its value and which parts ran."""
    out = {}
    for key, value in summary.items():
        if key.endswith("_partial"):
            number = "not computed" if value["value"] is None else f"{value['value']:.4f}"
            note = "" if value["value"] is None else "; not the official score"
            out[key.removesuffix("_partial")] = f"{number} ({describe_partial(value)}{note})"
        else:
            out[key] = value
    return out


def report_concept_scores(args: argparse.Namespace, data: ReportData, pair: Pair) -> tuple[dict, list[dict]]:
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
    verdict = submission_verdict(validate_file("concepts", pair.pred, read_id_list(pair.gt)), bool(args.limit))
    return {**summary, "submission check": verdict}, rows


def report_caption_scores(args: argparse.Namespace, data: ReportData, pair: Pair) -> tuple[dict, list[dict]]:
    """The captions part of the page's summary and each image's scores."""
    keep = set(data.ids)
    summary, rows = caption_scores({i: c for i, c in data.captions_gt.items() if i in keep}, data.captions_pred,
                                   args.bertscore_model, args.bertscore_layers, args.bleurt_model,
                                   args.bleurt_batch_size)
    verdict = submission_verdict(validate_file("captions", pair.pred, read_id_list(pair.gt)), bool(args.limit))
    return {**readable(summary), "submission check": verdict}, rows


def report_scores(args: argparse.Namespace, data: ReportData,
                  pairs: dict[str, Pair]) -> tuple[dict, dict[str, dict[str, float]]]:
    """The page's summary, and image ID -> its scores."""
    shown = len(data.ids)
    run: dict = {"images": shown if shown == data.ground_truth_images else f"first {shown:,} of "
                 f"{data.ground_truth_images:,} (--limit)"}
    summary: dict = {"run": run}
    rows: list[dict] = []
    score_task = {"concepts": report_concept_scores, "captions": report_caption_scores}
    for task, pair in pairs.items():
        run[task] = f"{pair.pred} vs {pair.gt}"
        summary[task], task_rows = score_task[task](args, data, pair)
        rows += task_rows
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

    pairs = report_pairs(args.gt, args.pred)
    check_report_options(args, pairs)
    for task, pair in pairs.items():
        for sign in swap_signs(task, pair.gt, pair.gt_rows, pair.pred, pair.pred_rows):
            errors.log(f"warning: {sign}")
    data = read_report_data(args, pairs)
    summary, scores = report_scores(args, data, pairs)
    cards = report_cards(data, scores, args.image_dir)
    title = args.title or "Error analysis: " + ", ".join(Path(pair.pred).name for pair in pairs.values())
    out = report.write_report(args.output_html, title=title, summary=summary, cards=cards, cui_names=data.cui_names)
    errors.log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(cards):,} images)")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main, hint=""))
