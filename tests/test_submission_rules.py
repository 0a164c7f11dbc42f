"""The organisers' file rules (submission.py): the 2026 pre-check rule by rule and on a recorded corpus of the
platform's own verdicts, the ID list and its header, the 2025 reader, the upload zip, `evaluate.py validate`.

How a run gets there (--ids_csv, the check after the run, --zip) is tested in test_submitting.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
from conftest import run_script

import evaluate
from jjvmed import errors, submission

# The organisers' order: neither natural (img_1, img_2, img_10, img_a, img_b) nor alphabetical
# (img_1, img_10, img_2, img_a, img_b).
IDS = ["img_10", "img_2", "img_b", "img_1", "img_a"]
CONCEPTS = "ID,CUIs\nimg_10,C0040405;C0817096\nimg_2,\nimg_b,C0024485\nimg_1,C1306645\nimg_a,C0000726\n"
CAPTIONS = ('ID,Caption\nimg_10,"CT of the chest, axial"\nimg_2,\nimg_b,MRI of the knee\nimg_1,"X-ray, AP view"\n'
            'img_a,Ultrasound\n')


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def ids_csv(path: Path, ids: list[str] = IDS) -> Path:
    """An ID list the way the organisers write theirs: header ID,CUIs, empty CUIs, ground-truth order."""
    return write(path, "ID,CUIs\r\n" + "".join(f"{i},\r\n" for i in ids))


def replace_line(text: str, number: int, new: str) -> str:
    lines = text.split("\n")
    lines[number - 1] = new
    return "\n".join(lines)


def test_read_id_list_keeps_the_files_order_skips_the_header_and_tolerates_a_bom(tmp_path):
    path = write(tmp_path / "ids.csv", "\ufeffID,CUIs\nimg_10,\n\n img_2 ,\nimg_b,\nimg_1,\nimg_a,\n")
    assert submission.read_id_list(path) == IDS
    assert submission.read_id_list(ids_csv(tmp_path / "organisers.csv")) == IDS
    assert submission.expected_ids(tmp_path / "organisers.csv") == IDS


def test_read_id_list_refuses_a_missing_file_an_empty_list_and_a_repeated_id(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        submission.read_id_list(tmp_path / "nope.csv")
    with pytest.raises(errors.UserError, match="lists no image IDs"):
        submission.read_id_list(write(tmp_path / "empty.csv", "ID,CUIs\n"))
    with pytest.raises(errors.UserError, match=r"'img_2' is listed twice \(lines 3 and 5\)") as caught:
        submission.read_id_list(write(tmp_path / "twice.csv", "ID,CUIs\nimg_10,\nimg_2,\nimg_b,\nimg_2,\n"))
    assert "\n" not in str(caught.value)


def test_an_image_folder_gives_the_ids_in_natural_order(tmp_path):
    for name in ("img_10.png", "img_2.jpg", "img_1.png"):
        (tmp_path / name).write_bytes(b"")
    assert submission.expected_ids(tmp_path) == ["img_1", "img_2", "img_10"]


@pytest.mark.parametrize("task, text", [("concepts", CONCEPTS), ("captions", CAPTIONS)])
def test_rows_in_the_id_list_order_are_accepted_though_neither_natural_nor_alphabetical(tmp_path, task, text):
    report = submission.validate_file(task, write(tmp_path / "pred.csv", text), IDS)
    assert report.accepted, report.errors
    assert report.rules == "2026"


def test_a_natural_order_file_is_rejected_at_its_first_row_with_the_out_of_place_count(tmp_path):
    natural = "ID,CUIs\nimg_1,C1306645\nimg_2,\nimg_10,C0040405\nimg_a,C0000726\nimg_b,C0024485\n"
    report = submission.validate_file("concepts", write(tmp_path / "pred.csv", natural), IDS)
    # Only img_2 is where the list wants it; nothing is missing or unknown, only the order is wrong.
    assert report.errors == ["line 2: ID order: expected 'img_10' at position 1, found 'img_1'; 4 of 5 rows are out "
                             "of place (rows must follow the order of the expected ID list exactly)"]


def test_the_order_is_checked_against_a_ground_truth_files_order(tmp_path):
    gt = write(tmp_path / "gt.csv", CAPTIONS)
    swapped = replace_line(replace_line(CAPTIONS, 3, "img_b,MRI of the knee"), 4, "img_2,")
    pred = write(tmp_path / "pred.csv", swapped)
    report = submission.validate_file("captions", pred, submission.expected_ids(gt))
    assert len(report.errors) == 1 and report.errors[0].startswith("line 3: ID order: expected 'img_2' at position 2")


CONCEPT_CASES = [
    # (what is wrong, the file, the line reported, what the message says)
    ("header", replace_line(CONCEPTS, 1, "ID,Concepts"), 1, "the header row must be ID,CUIs"),
    ("header case", replace_line(CONCEPTS, 1, "id,CUIs"), 1, "the header row must be ID,CUIs"),
    ("header spaces", replace_line(CONCEPTS, 1, "ID, CUIs"), 1, "the header row must be ID,CUIs"),
    ("bare ID", replace_line(CONCEPTS, 3, "img_2"), 3, "1 field; every row is exactly ID,CUIs"),
    ("three fields", replace_line(CONCEPTS, 4, "img_b,C0024485,C0817096"), 4, "3 fields"),
    ("space before ID", replace_line(CONCEPTS, 4, " img_b,C0024485"), 4, "whitespace around the ID"),
    ("space after ID", replace_line(CONCEPTS, 4, "img_b ,C0024485"), 4, "whitespace around the ID"),
    ("space before CUIs", replace_line(CONCEPTS, 4, "img_b, C0024485"), 4, "whitespace around the CUIs field"),
    ("space after CUIs", replace_line(CONCEPTS, 3, "img_2, "), 3, "whitespace around the CUIs field"),
    ("blank line inside", CONCEPTS.replace("img_2,\n", "img_2,\n\n"), 4, "blank line"),
    ("blank line at the end", CONCEPTS + "\n", 7, "blank line"),
    ("whitespace-only line", CONCEPTS + "  \n", 7, "blank line"),
    ("trailing ;", replace_line(CONCEPTS, 4, "img_b,C0024485;"), 4, "empty CUI"),
    ("double ;", replace_line(CONCEPTS, 2, "img_10,C0040405;;C0817096"), 2, "empty CUI"),
    ("lower-case CUI", replace_line(CONCEPTS, 4, "img_b,c0024485"), 4, "not a CUI"),
    ("not C + digits", replace_line(CONCEPTS, 4, "img_b,C0024485X"), 4, "not a CUI"),
    ("a name instead of a CUI", replace_line(CONCEPTS, 4, "img_b,Computed Tomography"), 4, "not a CUI"),
    ("CUI twice", replace_line(CONCEPTS, 2, "img_10,C0040405;C0040405"), 2, "concept repeated"),
    ("101 CUIs", replace_line(CONCEPTS, 4, "img_b," + ";".join(f"C{i:07d}" for i in range(101))), 4,
     "101 concepts for 'img_b'; at most 100"),
    ("ID twice", CONCEPTS + "img_b,C0024485\n", 7, "duplicate image ID 'img_b' (first on line 4)"),
    ("unknown ID", replace_line(CONCEPTS, 6, "img_z,C0000726"), 6, "unknown image ID 'img_z'"),
    ("rows swapped", replace_line(replace_line(CONCEPTS, 3, "img_b,C0024485"), 4, "img_2,"), 3, "ID order"),
    ("empty file", "", 1, "the file is empty"),
]

CAPTION_CASES = [
    ("header", replace_line(CAPTIONS, 1, "ID,caption"), 1, "the header row must be ID,Caption"),
    ("comma outside the quotes", replace_line(CAPTIONS, 4, 'img_b,"MRI, knee" (arrow)'), 4,
     "contains a comma but is not enclosed in double quotes"),
    ("unquoted comma", replace_line(CAPTIONS, 4, "img_b,MRI, knee"), 4, "3 fields"),
    ("no caption field", replace_line(CAPTIONS, 3, "img_2"), 3, "1 field; every row is exactly ID,Caption"),
    ("space before ID", replace_line(CAPTIONS, 6, " img_a,Ultrasound"), 6, "whitespace around the ID"),
    ("blank line", CAPTIONS.replace("img_2,\n", "img_2,\n\n"), 4, "blank line"),
    ("ID twice", CAPTIONS + "img_2,again\n", 7, "duplicate image ID 'img_2'"),
    # The pre-check pairs the n-th row with the n-th line, so a caption over two lines shifts the rows below.
    ("a caption over two lines", CAPTIONS.replace('"CT of the chest, axial"', '"CT of the chest\naxial, arrow, mass"'),
     4, "the platform checks line 3 of the file for this row"),
]


CASES = [("concepts", *case) for case in CONCEPT_CASES] + [("captions", *case) for case in CAPTION_CASES]


@pytest.mark.parametrize("task, name, text, line, message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_each_2026_rule_rejects_with_the_line_number(tmp_path, task, name, text, line, message):
    report = submission.validate_file(task, write(tmp_path / "pred.csv", text), IDS)
    assert not report.accepted
    assert any(e.startswith(f"line {line}: ") and message in e for e in report.errors), report.errors


def test_a_utf8_bom_is_named_plainly_not_as_a_wrong_header_or_unknown_id(tmp_path):
    report = submission.validate_file("concepts", write(tmp_path / "pred.csv", b"\xef\xbb\xbf" + CONCEPTS.encode()),
                                      IDS)
    assert len(report.errors) == 1 and report.errors[0].startswith("line 1: the file starts with a UTF-8 BOM")


def test_bytes_that_are_not_utf8_are_reported_on_their_line_and_the_rest_still_checked(tmp_path):
    data = replace_line(CONCEPTS, 4, "img_b,C0024485").encode().replace(b"img_b,C0024485", b"img_b,C002448\xe9")
    report = submission.validate_file("concepts", write(tmp_path / "pred.csv", data), IDS)
    assert report.errors[0].startswith("line 4: not UTF-8")
    assert any(e.startswith("line 4: not a CUI") for e in report.errors)


def test_a_missing_id_is_reported_with_the_count(tmp_path):
    pred = write(tmp_path / "pred.csv", CONCEPTS.replace("img_a,C0000726\n", ""))
    report = submission.validate_file("concepts", pred, IDS)
    assert report.errors == ["1 of the 5 expected image IDs is missing (img_a)"]


def test_what_the_pre_check_allows_is_accepted(tmp_path):
    # Windows line ends, no final newline, spaces around CUIs inside the field, an empty CUIs field,
    # a 4-digit CUI (accepted, with a warning), quotes inside a caption, a caption with outer spaces.
    concepts = ("ID,CUIs\r\nimg_10,C0040405; C0817096\r\nimg_2,\r\nimg_b,C0024485\r\nimg_1,C1306\r\n"
                "img_a,C0000726")
    report = submission.validate_file("concepts", write(tmp_path / "c.csv", concepts), IDS)
    assert report.accepted, report.errors
    assert report.warnings == ["line 5: accepted, but not a 7-digit UMLS CUI: C1306"]
    captions = ('ID,Caption\nimg_10,"The ""arrow"", a mass"\nimg_2,\nimg_b,He said "hi"\nimg_1, CT \n'
                'img_a,"Ultrasound"')
    report = submission.validate_file("captions", write(tmp_path / "k.csv", captions), IDS)
    assert report.accepted, report.errors
    assert report.warnings == ["line 3: empty caption for 'img_2'"]


def test_without_expected_ids_only_the_format_is_checked(tmp_path):
    natural = CONCEPTS.replace("img_10,", "img_99,")
    assert submission.validate_file("concepts", write(tmp_path / "pred.csv", natural), None).accepted


def test_2025_rules_read_old_files_the_old_way(tmp_path):
    # Accepted in 2025: a BOM, any order, a bare ID row, a stray ';'; each rejected in 2026.
    old = "\ufeffID,CUIs\nimg_a,C0000726\nimg_1,C1306645;\nimg_2\nimg_b,C0024485\nimg_10,C0040405\n"
    pred = write(tmp_path / "old.csv", old)
    report = submission.validate_file("concepts", pred, IDS, rules="2025")
    assert report.accepted and report.rules == "2025"
    assert any("line 3" in w and "stray ';'" in w for w in report.warnings)
    assert not submission.validate_file("concepts", pred, IDS).accepted
    assert evaluate.main(["validate", "--task", "concepts", "--pred", str(pred), "--ids_csv",
                          str(ids_csv(tmp_path / "ids.csv")), "--rules", "2025"]) == 0
    # The 2025 scorer reads the rows as before: a bare ID is no concept, a stray ';' the concept ''.
    pairs = submission.concept_pairs(submission.read_rows(pred))
    assert pairs["img_2"] == () and pairs["img_1"] == ("C1306645", "")


def test_write_zip_holds_only_submission_csv_with_the_files_bytes(tmp_path):
    csv_path = write(tmp_path / "run-3 captions.csv", CAPTIONS.replace("\n", "\r\n"))
    out = submission.write_zip(csv_path, tmp_path / "upload" / "run3.zip")
    assert out == tmp_path / "upload" / "run3.zip"
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == ["submission.csv"]
        assert archive.read("submission.csv") == csv_path.read_bytes()
        assert archive.testzip() is None
    assert [p.name for p in out.parent.iterdir()] == ["run3.zip"]  # no temporary file left behind
    with pytest.raises(errors.UserError, match="must end in .zip"):
        submission.write_zip(csv_path, csv_path)


def test_validate_writes_the_zip_only_for_an_accepted_file(tmp_path, capsys):
    ids = str(ids_csv(tmp_path / "ids.csv"))
    good = write(tmp_path / "good.csv", CONCEPTS)
    upload = tmp_path / "upload.zip"
    assert evaluate.main(["validate", "--task", "concepts", "--pred", str(good), "--ids_csv", ids, "--zip",
                          str(upload)]) == 0
    with zipfile.ZipFile(upload) as archive:
        assert archive.namelist() == ["submission.csv"] and archive.read("submission.csv") == good.read_bytes()
    assert f"wrote {upload}" in capsys.readouterr().err
    bad = write(tmp_path / "bad.csv", CONCEPTS + "\n")
    other = tmp_path / "other.zip"
    assert evaluate.main(["validate", "--task", "concepts", "--pred", str(bad), "--ids_csv", ids, "--zip",
                          str(other)]) == 1
    assert not other.exists()
    assert "no zip written" in capsys.readouterr().err
    assert evaluate.main(["validate", "--task", "concepts", "--pred", str(bad), "--ids_csv", ids, "--zip",
                          str(upload)]) == 1
    assert "from an earlier run: do not upload it" in capsys.readouterr().err
    with pytest.raises(errors.UserError, match="--zip needs --ids_csv or --gt"):
        evaluate.main(["validate", "--task", "concepts", "--pred", str(good), "--zip", str(other)])


def test_validate_exit_codes_from_the_command_line(tmp_path):
    ids = str(ids_csv(tmp_path / "ids.csv"))
    good = write(tmp_path / "good.csv", CAPTIONS)
    natural = write(tmp_path / "natural.csv", "ID,Caption\nimg_1,a\nimg_2,b\nimg_10,c\nimg_a,d\nimg_b,e\n")
    accepted = run_script("evaluate.py", "validate", "--task", "captions", "--pred", str(good), "--ids_csv", ids)
    assert accepted.returncode == 0 and "accepted (2026 rules)" in accepted.stderr
    rejected = run_script("evaluate.py", "validate", "--task", "captions", "--pred", str(natural), "--ids_csv", ids)
    assert rejected.returncode == 1 and "line 2: ID order" in rejected.stderr
    missing = run_script("evaluate.py", "validate", "--task", "captions", "--pred", str(good), "--ids_csv",
                         str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------------
# The platform's own verdicts
# ---------------------------------------------------------------------------------------------

# 948 edge-case files for both tasks (headers, BOM, line ends, blank and whitespace-only records, quoting,
# captions over several lines, CUI shapes, ID order, encodings, IDs containing "ID", ground-truth and ID-list
# variants), each with the verdict of the organisers' own code (their 2026 pre-check, then their scorer's
# reader), as benchmarks/platform_agreement.py recorded them.
VERDICTS = Path(__file__).parent / "data" / "platform_verdicts.json"
ORGANISERS_REPO = os.environ.get("JJVMED_ORGANISERS_REPO")


def recorded_cases(task: str) -> list[dict]:
    data = json.loads(VERDICTS.read_text(encoding="utf-8"))
    files = {key: base64.b64decode(value["base64"]) if "base64" in value else value["text"].encode("utf-8")
             for key, value in data["files"].items()}
    cases = [dict(zip(data["columns"], row, strict=True)) for row in data["cases"]]
    return [case | {"submission": files[case["submission"]], "reference": files[case["reference"]]}
            for case in cases if case["task"] == task]


def tool_verdict(task: str, case: dict, folder: Path) -> tuple[str, list[str]]:
    """The verdict the way benchmarks/platform_agreement.py asks for it: with the ground truth, or the ID list."""
    pred = write(folder / "submission.csv", case["submission"])
    reference = write(folder / "reference.csv", case["reference"])
    try:
        if case["role"] == "gt":
            report = submission.validate_file(task, pred, None, ground_truth=reference)
        else:
            report = submission.validate_file(task, pred, reference)
    except errors.UserError as e:
        return "rejected", [str(e)]
    return ("accepted" if report.accepted else "rejected"), report.errors


@pytest.mark.parametrize("task", ["concepts", "captions"])
def test_every_recorded_file_gets_the_verdict_the_platform_gave(tmp_path, task):
    cases = recorded_cases(task)
    assert len(cases) > 400 and {c["platform"] for c in cases} == {"accepted", "rejected"}
    wrong = []
    for number, case in enumerate(cases):
        folder = tmp_path / str(number)
        folder.mkdir()
        verdict, said = tool_verdict(task, case, folder)
        if verdict != case["platform"]:
            wrong.append(f"{case['name']} [{case['role']}]: the platform {case['platform']} it "
                         f"({case['message']}); the tool {verdict} it {said[:2]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.skipif(not ORGANISERS_REPO, reason="set JJVMED_ORGANISERS_REPO to a checkout of "
                    "taubsity/clef-caption-evaluation-2026 to run the organisers' own code")
def test_the_organisers_code_still_gives_the_recorded_verdicts_and_the_tool_agrees(tmp_path):
    recording = tmp_path / "verdicts.json"
    result = run_script("benchmarks/platform_agreement.py", "--organisers_repo", ORGANISERS_REPO, "--record",
                        str(recording))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    files, agree = re.search(r"^\| all \| (\d+) \| (\d+) \| 0 \| 0 \|", result.stdout, re.M).groups()
    assert files == agree
    now, then = (json.loads(p.read_text(encoding="utf-8")) for p in (recording, VERDICTS))
    assert now["cases"] == then["cases"] and now["files"] == then["files"]


# ---------------------------------------------------------------------------------------------
# What the platform does that the validator once got wrong
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record, line", [('""\n', 7), ('" "\n', 7), ('"\t"\n', 7), ('"\r"\n', 7), ('"\n"\n', 7),
                                          ('"', 7), ('"\n', 7)])
def test_a_record_of_quotes_around_whitespace_is_a_row_the_platform_rejects_not_a_blank_line(tmp_path, record, line):
    # The raw line is not blank, so the pre-check reads it as a row of 1 field: "Expected exactly 2 columns".
    report = submission.validate_file("concepts", write(tmp_path / "pred.csv", CONCEPTS + record), IDS)
    assert not report.accepted
    assert len(report.errors) == 1 and report.errors[0].startswith(f"line {line}: ")
    assert "row without an ID" in report.errors[0] and "delete it" in report.errors[0]


def test_an_id_with_a_leading_space_is_one_error_not_three(tmp_path):
    # The image file " scan_1.png" gives the ID " scan_1": the platform refuses the space; that is the one problem.
    pred = write(tmp_path / "pred.csv", "ID,Caption\n scan_1,a\nscan_2,b\n")
    report = submission.validate_file("captions", pred, [" scan_1", "scan_2"])
    assert report.errors == ["line 2: whitespace around the ID ' scan_1'"]
    report = submission.validate_file("captions", pred, ["scan_1", "scan_2"])
    assert report.errors == ["line 2: whitespace around the ID ' scan_1'"]


def test_some_ids_containing_ID_are_accepted_with_a_warning_that_they_are_not_scored(tmp_path):
    # The concept scorer skips such rows in the file and in the ground truth alike, so the platform scores the rest.
    ids = ["img_1", "scan_ID_2", "img_3"]
    pred = write(tmp_path / "pred.csv", "ID,CUIs\nimg_1,C0040405\nscan_ID_2,C0817096\nimg_3,\n")
    report = submission.validate_file("concepts", pred, ids)
    assert report.accepted, report.errors
    assert report.warnings == ["1 image ID contains 'ID', so the concept scorer skips its row as headers and it is "
                               "not scored: scan_ID_2"]
    only = write(tmp_path / "only.csv", "ID,CUIs\nscan_ID_2,C0817096\n")
    report = submission.validate_file("concepts", only, ["scan_ID_2"])
    assert not report.accepted and "no image would be scored" in report.errors[0]


@pytest.mark.parametrize("header", ["ID,CUIs", "id,caption", "image_id,caption", "Image,Whatever", "\ufeffID,x", "ID"])
def test_the_first_row_of_an_id_list_is_its_header_whatever_it_names(tmp_path, header):
    path = write(tmp_path / "ids.csv", header + "\n" + "".join(f"{i},\n" for i in IDS))
    assert submission.read_id_list(path) == IDS
    report = submission.validate_file("concepts", write(tmp_path / "pred.csv", CONCEPTS), path)
    assert report.accepted, report.errors


@pytest.mark.parametrize("text, message", [
    ("img_10\nimg_2\n", "the first row starts with 'img_10', which looks like an image ID"),
    ("ROCOv2_2023_test_000001,\nROCOv2_2023_test_000002,\n", "add a header row ID above it"),
    ("\nID,CUIs\nimg_10,\n", "line 1 is blank; the first row must be the header"),
    ("", "is empty; its first row must be the header"),
])
def test_an_id_list_without_a_header_is_refused_rather_than_losing_its_first_id(tmp_path, text, message):
    path = write(tmp_path / "ids.csv", text)
    for read in (submission.read_id_list, lambda p: submission.validate_file("concepts", write(
            tmp_path / "pred.csv", CONCEPTS), p)):
        with pytest.raises(errors.UserError, match=re.escape(message)) as caught:
            read(path)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("gt, message", [
    (CAPTIONS.replace("img_b,", "\nimg_b,"), "line 4: blank row; the organisers' caption scorer stops at it"),
    (CAPTIONS.replace("img_b,", " img_b,"), "line 4: whitespace around the ID ' img_b'"),
    ("\ufeff" + CAPTIONS, "line 1: the organisers' caption scorer reads the header '\\ufeffID' as an image"),
    (CAPTIONS.replace("ID,Caption", "Image,Caption"), "reads the header 'Image' as an image"),
    (CAPTIONS.replace("img_b,MRI of the knee", "img_b"), "line 4: no second field after 'img_b'"),
])
def test_a_ground_truth_the_organisers_scorer_cannot_use_rejects_every_file(tmp_path, gt, message):
    # The pre-check passes (it skips blank rows, strips IDs and always skips the first row); their scorer then fails.
    pred = write(tmp_path / "pred.csv", CAPTIONS)
    report = submission.validate_file("captions", pred, None, ground_truth=write(tmp_path / "gt.csv", gt))
    assert not report.accepted
    assert any(message in e for e in report.errors), report.errors
    # Used as an ID list only (the platform's pre-check), the same file is fine.
    assert submission.validate_file("captions", pred, tmp_path / "gt.csv").accepted


def test_validate_with_gt_names_the_ground_truths_blank_row(tmp_path):
    gt = write(tmp_path / "gt.csv", CAPTIONS + "\n")
    pred = write(tmp_path / "pred.csv", CAPTIONS)
    result = run_script("evaluate.py", "validate", "--task", "captions", "--pred", str(pred), "--gt", str(gt))
    assert result.returncode == 1 and "REJECTED (1 problem)" in result.stderr
    assert f"ground truth {gt} line 7: blank row" in result.stderr
    assert run_script("evaluate.py", "validate", "--task", "captions", "--pred", str(pred), "--ids_csv",
                      str(gt)).returncode == 0


def test_counts_of_one_read_in_the_singular(tmp_path, capsys):
    report = submission.validate_file("concepts", write(tmp_path / "pred.csv", CONCEPTS + "\n"), IDS)
    submission.log_report(report, "pred.csv")
    assert "REJECTED (1 problem) " in capsys.readouterr().err
    swapped = replace_line(replace_line(CONCEPTS, 5, "img_a,C0000726"), 6, "img_1,C1306645")
    assert "2 of 5 rows are out of place" in submission.validate_file(
        "concepts", write(tmp_path / "swapped.csv", swapped), IDS).errors[0]
    extra = write(tmp_path / "extra.csv", CONCEPTS + "img_z,\n")
    assert "1 of 6 rows is out of place" in submission.validate_file("concepts", extra, IDS).errors[-1]
    with pytest.raises(errors.UserError, match=r"^1 of the 6 IDs in .* has no image \(first: img_z\)$"):
        submission.in_id_list_order([(i, None) for i in IDS], ids_csv(tmp_path / "ids.csv", [*IDS, "img_z"]), "image")
