"""Does `jjvmed.submission.validate_file` give the platform's verdict? Hundreds of edge-case files, both tasks.

    python benchmarks/platform_agreement.py --organisers_repo DIR [--record tests/data/platform_verdicts.json]
        [--keep DIR] [--random N --seed S]

DIR is a checkout of the organisers' public evaluator (github.com/taubsity/clef-caption-evaluation-2026).
Their code is read from DIR at run time, never copied here. For each file of the corpus (made below, in
code) the platform's verdict is what their code says, in the platform's order:
1. the pre-check (`submission_check.check_submission`), against the ground truth, or against an ID list
   as their `Dockerfile.*-check` images run it (the ID list as both ground truths for concepts);
2. the scorer's reader on the ground truth and the file: for concepts their whole `ConceptEvaluator`
   (reader and both scores: it needs scikit-learn), for captions `CaptionEvaluator.load_gt` and
   `load_predictions` only (the scores need GPUs and licensed models; those two methods are taken out of
   their class with `ast`, so its heavy imports are not needed). With an ID list, the scorer reads the
   well-formed ground truth of the same IDs, as the hidden test ground truth would be.
Any exception counts as a rejection: the platform scores nothing then.

The tool's verdict is `validate_file(task, submission, ...)` with the 2026 rules; a `UserError` (an
unreadable ID list, say) counts as a rejection. Prints one table: files, agreements, disagreements, the
dangerous ones (the tool accepts what the platform rejects), and for files both reject, how many of the
tool's messages name the platform's reason. Then each disagreement with both verdicts. Exit code 1 if
any disagreement.

`--random N` adds N files made by random edits of good files and references (characters the rules turn
on), to look for what the corpus misses. `--record PATH` writes the corpus (without the random files) and
the platform's verdicts as JSON (tests/data/platform_verdicts.json is such a recording, read by
tests/test_submission_rules.py).
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import random
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jjvmed import errors, submission  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

# The organisers' order is neither natural nor alphabetical.
IDS = [f"clef26_valid_{n}" for n in (10, 2, 7, 1, 3)]
# Some IDs hold the letters "ID": the concept scorer skips such rows on both sides as headers.
IDS_WITH_ID = [IDS[0], "clef26_ID_2", IDS[2], "ID_1", IDS[4]]
ALL_ID = [f"IDX_{n}" for n in (10, 2, 7)]
LOWER_ID = [IDS[0], "img_id_2", IDS[2]]

# Ground-truth CUIs: every image but one holds a CUI of the secondary score's allowed list, so the
# organisers' secondary score has something to count.
GT_CUIS = ["C0040405;C0817096;C0225860", "C0024485;C0022745", "", "C1306645;C0037303", "C0041618;C0000726"]
PRED_CUIS = ["C0040405;C0817096", "C0024485", "", "C1306645;C0024109", "C0041618"]
GT_CAPTIONS = ["CT of the chest, axial view, showing a mass.", "MRI of the knee.", "",
               'Plain x-ray of the pelvis ("AP").', "Ultrasound of the abdomen; no free fluid."]
PRED_CAPTIONS = ["CT scan of the chest, axial.", "MRI of the knee", "", "X-ray of the pelvis",
                 "Abdominal ultrasound"]
HEADER = {"concepts": "ID,CUIs", "captions": "ID,Caption"}


@dataclass(frozen=True)
class Case:
    name: str
    task: str
    submission: bytes
    reference: bytes  # the ground truth, or the ID list (`role`)
    role: str  # "gt": the file the platform scores against; "ids": the organisers' ID list
    scorer_gt: bytes  # what the scorer reads: the reference itself, or the well-formed ground truth


def quote(value: str) -> str:
    """A CSV field as csv.writer writes it (quoted only when needed)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([value])
    return out.getvalue()


def values_for(task: str, ids: list[str], truth: bool) -> list[str]:
    if task == "concepts":
        source = GT_CUIS if truth else PRED_CUIS
    else:
        source = [quote(v) for v in (GT_CAPTIONS if truth else PRED_CAPTIONS)]
    return [source[i % len(source)] for i in range(len(ids))]


def lines_for(task: str, ids: list[str], truth: bool = False) -> list[str]:
    """The header and one line per ID, the way a careful participant writes them."""
    return [HEADER[task]] + [f"{i},{v}" for i, v in zip(ids, values_for(task, ids, truth), strict=True)]


def text(lines: list[str], end: str = "\n", final: bool = True) -> bytes:
    return (end.join(lines) + (end if final else "")).encode("utf-8")


def ground_truth(task: str, ids: list[str]) -> bytes:
    return text(lines_for(task, ids, truth=True))


def id_list(task: str, ids: list[str]) -> bytes:
    """The organisers' ids.csv (their create_ids_csv.py: csv.writer, so CRLF; empty second field)."""
    return text([HEADER[task]] + [f"{i}," for i in ids], end="\r\n")


def replaced(lines: list[str], number: int, new: str | list[str]) -> list[str]:
    """`lines` with line `number` (1 = the header) replaced by one or more lines."""
    return lines[:number - 1] + ([new] if isinstance(new, str) else new) + lines[number:]


def submission_cases(task: str) -> list[tuple[str, bytes]]:
    """(name, file) for one task, checked against the well-formed ground truth of IDS."""
    good = lines_for(task, IDS)
    other = "captions" if task == "concepts" else "concepts"
    cases: list[tuple[str, bytes]] = [("good", text(good)), ("good, no final newline", text(good, final=False))]

    # Encodings and byte order marks
    utf8 = text(good)
    cases += [
        ("BOM", b"\xef\xbb\xbf" + utf8),
        ("BOM, CRLF", b"\xef\xbb\xbf" + text(good, "\r\n")),
        ("UTF-16 LE with BOM", "\n".join(good).encode("utf-16")),
        ("UTF-16 BE without BOM", "\n".join(good).encode("utf-16-be")),
        ("Latin-1 byte in the last value", text(good).replace(good[5].encode(), good[5].encode() + b"\xe9")),
        ("Latin-1 byte in an ID", text(good).replace(b"_2,", b"_2\xe9,")),
        ("CP1252 quotes in a value", text(good).replace(good[2].encode(), good[2].encode() + b"\x93x\x94")),
        ("not UTF-8 in the header", b"ID,C\xffUIs\n" + text(good[1:])),
        ("NUL byte in a value", text(replaced(good, 2, good[1] + "\x00"))),
        ("zero-width space before the header", text(["\u200b" + good[0], *good[1:]])),
        ("NBSP after an ID", text(replaced(good, 4, good[3].replace(",", "\xa0,", 1)))),
    ]
    if task == "captions":
        cases += [("non-ASCII caption (UTF-8)", text(replaced(good, 3, IDS[1] + ",Résumé: IRM du genou – 3 T")))]

    # Line endings
    for label, end in (("CRLF", "\r\n"), ("CR", "\r"), ("LF", "\n")):
        cases += [(f"{label} line ends", text(good, end)), (f"{label}, no final line end", text(good, end, False)),
                  (f"{label}, an extra line end at the end", text(good, end) + end.encode())]
    cases += [
        ("mixed LF and CRLF", "\n".join(good[:3]).encode() + b"\r\n" + text(good[3:], "\r\n")),
        ("mixed LF and CR", text(good[:3], "\r") + text(good[3:])),
        ("CR CR LF line ends", text(good, "\r\r\n")),
        ("LF CR line ends", text(good, "\n\r")),
    ]

    # Blank and whitespace-only lines
    for where, number in (("after the header", 2), ("inside", 4), ("at the end", len(good) + 1)):
        for label, blank in (("blank", ""), ("space", " "), ("tab", "\t"), ("NBSP", "\xa0"), ("form feed", "\x0c"),
                             ("U+2028", "\u2028"), ("U+0085", "\x85"), ("U+001C", "\x1c"), ("two spaces", "  ")):
            lines = good[:number - 1] + [blank] + good[number - 1:]
            cases.append((f"{label} line {where}", text(lines)))
    cases += [
        ("two blank lines at the end", text(good) + b"\n"),
        ("blank line before the header", text(["", *good])),
        ("blank line before the header and at the end", text(["", *good, ""])),
        ("CRLF blank line at the end", text(good, "\r\n") + b"\r\n"),
    ]

    # Records made of one quoted field holding only whitespace, and a lone quote
    for label, record in (('""', '""'), ('" "', '" "'), ("a quoted tab", '"\t"'), ("a quoted CR", '"\r"'),
                          ("a quoted LF", '"\n"'), ("a quoted CRLF", '"\r\n"'), ("quoted spaces over two lines",
                                                                                    '"  \n  "'),
                          ("a quoted NBSP", '"\xa0"'), ('"",""', '"",""'), ('" ",', '" ",'), (",", ","),
                          (",,", ",,"), ('a lone "', '"')):
        cases.append((f"{label} at the end", text([*good, record])))
        cases.append((f"{label} inside", text(good[:3] + [record] + good[3:])))
    cases += [
        ('a lone " at the end, no final newline', text([*good, '"'], final=False)),
        ('a lone " and a newline at the end', text(good) + b'"\n'),
        ('"" at the end, no final newline', text([*good, '""'], final=False)),
    ]

    # Headers
    for label, header in (("the other task's header", HEADER[other]), ("lower case", HEADER[task].lower()),
                          ("upper case", HEADER[task].upper()), ("a space after the comma",
                                                                 HEADER[task].replace(",", ", ")),
                          ("a space before ID", " " + HEADER[task]), ("quoted", '"ID","' + HEADER[task][3:] + '"'),
                          ("three columns", HEADER[task] + ",Extra"), ("a trailing comma", HEADER[task] + ","),
                          ("one column", "ID"), ("semicolon", HEADER[task].replace(",", ";")),
                          ("tab", HEADER[task].replace(",", "\t")), ("Image_ID", "Image_" + HEADER[task]),
                          ("id only lower", "id" + HEADER[task][2:])):
        cases.append((f"header: {label}", text(replaced(good, 1, header))))
    cases += [
        ("no header", text(good[1:])),
        ("the header twice", text([good[0], *good])),
        ("the header again at the end", text([*good, good[0]])),
        ("the header again inside", text(good[:3] + [good[0]] + good[3:])),
        ("empty file", b""),
        ("only a newline", b"\n"),
        ("header only", text(good[:1])),
        ("header only, no newline", text(good[:1], final=False)),
    ]

    # Fields per row
    cases += [
        ("a bare ID row", text(replaced(good, 3, IDS[1]))),
        ("every row a bare ID", text([good[0], *IDS])),
        ("three fields", text(replaced(good, 3, f"{IDS[1]},a,b"))),
        ("a trailing comma", text(replaced(good, 3, good[2] + ","))),
        ("a semicolon instead of the comma", text(replaced(good, 3, good[2].replace(",", ";", 1)))),
        ("a tab instead of the comma", text(replaced(good, 3, good[2].replace(",", "\t", 1)))),
    ]

    # Whitespace around the ID
    for label, new in (("a space before", " " + good[3]), ("a space after", good[3].replace(",", " ,", 1)),
                       ("a tab before", "\t" + good[3]), ("an NBSP before", "\xa0" + good[3]),
                       ("a quoted space before", '" ' + good[3].replace(",", '",', 1)),
                       ("quoted, no space", '"' + good[3].replace(",", '",', 1))):
        cases.append((f"ID with {label}", text(replaced(good, 4, new))))
    cases.append(("ID with a space before, first row", text(replaced(good, 2, " " + good[1]))))

    # The ID set and order
    body = good[1:]
    natural = sorted(body, key=lambda line: int(line.split(",")[0].rsplit("_", 1)[1]))
    cases += [
        ("two rows swapped", text([good[0], body[1], body[0], *body[2:]])),
        ("last two swapped", text([good[0], *body[:-2], body[-1], body[-2]])),
        ("reversed", text([good[0], *reversed(body)])),
        ("natural order", text([good[0], *natural])),
        ("alphabetical order", text([good[0], *sorted(body)])),
        ("first ID missing", text([good[0], *body[1:]])),
        ("middle ID missing", text([good[0], *body[:2], *body[3:]])),
        ("last ID missing", text(good[:-1])),
        ("an unknown ID at the end", text([*good, body[0].replace("_10,", "_99,")])),
        ("an unknown ID inside", text(replaced(good, 3, good[2].replace("_2,", "_22,")))),
        ("an ID twice, adjacent", text(good[:3] + [good[2]] + good[3:])),
        ("an ID twice, at the end", text([*good, good[1]])),
        ("an ID in place of another", text(replaced(good, 4, good[1]))),
        ("an ID in the wrong case", text(replaced(good, 2, good[1].replace("clef", "CLEF")))),
        ("an ID with a file extension", text(replaced(good, 2, good[1].replace(",", ".jpg,", 1)))),
        ("last year's prefix", text([good[0], *(line.replace("clef26", "clef25") for line in body)])),
        ("an empty ID", text(replaced(good, 3, "," + good[2].split(",", 1)[1]))),
    ]

    if task == "concepts":
        cases += concept_value_cases(good)
    else:
        cases += caption_value_cases(good)
    return cases


def concept_value_cases(good: list[str]) -> list[tuple[str, bytes]]:
    def with_cuis(value: str, number: int = 3) -> bytes:
        return text(replaced(good, number, f"{IDS[number - 2]},{value}"))

    cuis_100 = ";".join(f"C{n:07d}" for n in range(100))
    cuis_101 = ";".join(f"C{n:07d}" for n in range(101))
    cases = [(f"CUIs: {label}", with_cuis(value)) for label, value in (
        ("lower-case c", "c0024485"), ("a bare C", "C"), ("twelve digits", "C002448500001"),
        ("three digits", "C024"), ("Arabic-Indic digits", "C\u0660\u0660\u0662\u0664\u0664\u0668\u0665"),
        ("full-width digits", "C\uff10\uff10\uff12\uff14\uff14\uff18\uff15"),
        ("spaces around ;", "C0024485 ; C0022745"), ("a space after ;", "C0024485; C0022745"),
        ("a trailing ;", "C0024485;"), ("a leading ;", ";C0024485"), ("double ;", "C0024485;;C0022745"),
        ("only ;", ";"), ("a space before the field", " C0024485"), ("a space after the field", "C0024485 "),
        ("only a space", " "), ("a tab", "\t"), ("names instead of CUIs", "Magnetic Resonance Imaging"),
        ("CUI prefix", "CUI0024485"), ("a full stop", "C0024485."), ("a CUI twice", "C0024485;C0024485"),
        ("a CUI twice, spaced", "C0024485; C0024485"), ("upper and lower case", "C0024485;c0024485"),
        ("commas inside quotes", '"C0024485,C0022745"'), ("spaces between CUIs", "C0024485 C0022745"),
        ("quoted", '"C0024485;C0022745"'), ("quoted with spaces", '" C0024485"'), ("100 CUIs", cuis_100),
        ("101 CUIs", cuis_101), ("101 CUIs with a trailing ;", cuis_101 + ";"),
        ("a pipe between CUIs", "C0024485|C0022745"), ("a CUI with a line break inside quotes",
                                                       '"C0024485\nC0022745"'))]
    return cases


def caption_value_cases(good: list[str]) -> list[tuple[str, bytes]]:
    def with_caption(value: str, number: int = 3) -> bytes:
        return text(replaced(good, number, f"{IDS[number - 2]},{value}"))

    cases = [(f"caption: {label}", with_caption(value)) for label, value in (
        ("a quoted comma", '"MRI, knee"'), ("an unquoted comma", "MRI, knee"),
        ("a comma after the closing quote", '"MRI, knee" (arrow)'), ("a quoted comma then text", '"MRI, knee" x'),
        ("a comma, quotes only at the start", '"MRI", knee'), ("escaped quotes", '"The ""arrow"", a mass"'),
        ("a quote inside an unquoted caption", 'He said "hi"'), ("only two quotes", '""'),
        ("only four quotes", '""""'), ("empty", ""), ("a space", " "), ("spaces around", " MRI of the knee "),
        ("a tab", "MRI\tknee"), ("single quotes around a comma", "'MRI, knee'"),
        ("backslash-escaped quotes", '"MRI \\"knee\\", left"'), ("a trailing comma after the quotes", '"MRI",'),
        ("an LF inside quotes", '"MRI of the\nknee"'), ("a CRLF inside quotes", '"MRI of the\r\nknee"'),
        ("a CR inside quotes", '"MRI of the\rknee"'), ("an LF and a comma inside quotes", '"MRI, of the\nknee"'),
        ("a blank line inside quotes", '"MRI of the\n\nknee"'), ("a space-only line inside quotes",
                                                                  '"MRI of the\n \nknee"'),
        ("an LF at the end inside quotes", '"MRI of the knee\n"'), ("a form feed", "MRI\x0cknee"),
        ("a form feed and a comma, quoted", '"MRI,\x0cknee"'), ("U+2028", "MRI\u2028knee"),
        ("U+2028 and a comma, quoted", '"MRI,\u2028knee"'), ("a vertical tab", "MRI\x0bknee"),
        ("a NEL", "MRI\x85knee"), ("an unterminated quote", '"MRI of the knee'),
        ("a long caption", quote("chest " * 300)), ("a quote in the middle of a comma caption",
                                                     'MRI "knee, left"'),
        ("a quoted caption with trailing spaces", '"MRI, knee"  '))]
    # A caption over two lines shifts the raw line the pre-check pairs with every row below it.
    two_lines = replaced(good, 2, f'{IDS[0]},"CT of the chest\naxial view"')
    cases += [
        ("a caption over two lines, then quoted commas", text(two_lines)),
        ("a caption over two lines, then an unquoted-looking comma", text(replaced(
            two_lines, 3, f'{IDS[1]},"MRI, knee" (x)'))),
        ("a caption over two lines above a caption whose line has a comma outside quotes",
         text(replaced(replaced(good, 2, f'{IDS[0]},"CT\nof the chest"'), 4, f'{IDS[2]},a,b'))),
        ("a caption over three lines at the end", text(replaced(good, len(good), f'{IDS[-1]},"a\nb\nc, d"'))),
        ("every caption quoted", text([good[0]] + [f'{i},"{v}"' for i, v in zip(IDS, PRED_CAPTIONS, strict=True)])),
    ]
    return cases


def ids_with_id_cases(task: str) -> list[tuple[str, list[str], bytes]]:
    """(name, ID set, file): IDs that hold the letters ID, which the concept scorer reads as headers."""
    cases = []
    for label, ids in (("some IDs hold ID", IDS_WITH_ID), ("every ID holds ID", ALL_ID),
                       ("an ID holds lower-case id", LOWER_ID)):
        good = lines_for(task, ids)
        cases += [(f"{label}: good", ids, text(good)),
                  (f"{label}: the ID row missing", ids, text([good[0], good[1], *good[3:]])),
                  (f"{label}: rows swapped", ids, text([good[0], good[2], good[1], *good[3:]])),
                  (f"{label}: bare ID row", ids, text(replaced(good, 3, ids[1])))]
        if task == "concepts":
            many = ";".join(f"C{n:07d}" for n in range(101))
            cases += [(f"{label}: 101 CUIs on the ID row", ids, text(replaced(good, 3, f"{ids[1]},{many}"))),
                      (f"{label}: a CUI twice on the ID row", ids,
                       text(replaced(good, 3, f"{ids[1]},C0000001;C0000001")))]
    return cases


def reference_variants(task: str) -> list[tuple[str, bytes]]:
    """(name, file) of ground truths / ID lists that differ from the organisers' usual ones."""
    gt = lines_for(task, IDS, truth=True)
    blank_inside = gt[:3] + [""] + gt[3:]
    return [
        ("as published", text(gt)),
        ("CRLF", text(gt, "\r\n")),
        ("CR", text(gt, "\r")),
        ("BOM", b"\xef\xbb\xbf" + text(gt)),
        ("header id lower case", text(replaced(gt, 1, HEADER[task].lower()))),
        ("header Id", text(replaced(gt, 1, "Id" + HEADER[task][2:]))),
        ("header image_id,caption", text(replaced(gt, 1, "image_id,caption"))),
        ("header Image_ID", text(replaced(gt, 1, "Image_ID," + HEADER[task][3:]))),
        ("header Image,Whatever", text(replaced(gt, 1, "Image,Whatever"))),
        ("header with a space before ID", text(replaced(gt, 1, " " + HEADER[task]))),
        ("header quoted", text(replaced(gt, 1, '"ID","x"'))),
        ("no header", text(gt[1:])),
        ("blank line before the header", text(["", *gt])),
        ("a blank row inside", text(blank_inside)),
        ("a blank row at the end", text(gt) + b"\n"),
        ("blank rows at the end, CRLF", text(gt, "\r\n") + b"\r\n\r\n"),
        ("a whitespace-only row", text(gt[:3] + ["  "] + gt[3:])),
        ("a bare ID row", text(replaced(gt, 3, IDS[1]))),
        ("a space around an ID", text(replaced(gt, 3, " " + gt[2]))),
        ("an ID twice", text([*gt, gt[2]])),
        ("an ID twice, with a space", text([*gt, " " + gt[2]])),
        ("three columns", text([line + ",x" for line in gt])),
        ("not UTF-8", text(gt) + b"clef26_valid_99,\xe9\n"),
        ("header only", text(gt[:1])),
        ("one column", text(["ID", *IDS])),
    ]


def corpus() -> list[Case]:
    cases = []
    for task in ("concepts", "captions"):
        clean_gt = ground_truth(task, IDS)
        clean_ids = id_list(task, IDS)
        for name, data in submission_cases(task):
            cases.append(Case(f"{name} (vs ground truth)", task, data, clean_gt, "gt", clean_gt))
            cases.append(Case(f"{name} (vs ID list)", task, data, clean_ids, "ids", clean_gt))
        for name, ids, data in ids_with_id_cases(task):
            cases.append(Case(f"{name} (vs ground truth)", task, data, ground_truth(task, ids), "gt",
                              ground_truth(task, ids)))
            cases.append(Case(f"{name} (vs ID list)", task, data, id_list(task, ids), "ids", ground_truth(task, ids)))
        good = text(lines_for(task, IDS))
        without_first = text([lines_for(task, IDS)[0], *lines_for(task, IDS)[2:]])
        for name, reference in reference_variants(task):
            for sub_name, data in (("good file", good), ("file without the first ID", without_first)):
                cases.append(Case(f"ground truth {name}: {sub_name}", task, data, reference, "gt", reference))
                cases.append(Case(f"ID list {name}: {sub_name}", task, data, reference, "ids", clean_gt))
    names = Counter(c.task + c.name for c in cases)
    assert max(names.values()) == 1, [n for n, k in names.items() if k > 1]
    return cases


# What random edits insert: the characters and pieces the rules turn on.
PIECES = ['"', ",", ";", "\r", "\n", "\r\n", " ", "\t", "\x0c", "\u2028", "\xa0", "ID", "7", "C", '""', ',"', '",', "x"]


def random_cases(count: int, seed: int) -> list[Case]:
    """Good files and references with a few random insertions and deletions each, for what the corpus misses."""
    rng = random.Random(seed)

    def edit(data: str, edits: int) -> str:
        for _ in range(edits):
            at = rng.randrange(len(data) + 1)
            if rng.random() < 0.7:
                data = data[:at] + rng.choice(PIECES) + data[at:]
            else:
                data = data[:at] + data[at + rng.randint(1, 3):]
        return data

    cases = []
    for number in range(count):
        task, role = rng.choice(["concepts", "captions"]), rng.choice(["gt", "ids"])
        ids = rng.choice([IDS, IDS_WITH_ID, LOWER_ID])
        data = edit(text(lines_for(task, ids)).decode(), rng.randint(1, 4)).encode()
        gt = ground_truth(task, ids)
        reference = gt if role == "gt" else id_list(task, ids)
        if rng.random() < 0.3:
            reference = edit(reference.decode(), 1).encode()
            gt = reference if role == "gt" else gt
        cases.append(Case(f"random {number}", task, data, reference, role, gt))
    return cases


# ---------------------------------------------------------------------------------------------
# The platform: the organisers' code, read from their checkout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    message: str  # the platform's first error, or the tool's errors joined by " | "


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_methods(path: Path, class_name: str, names: list[str]) -> type:
    """Some methods of a class of theirs, compiled from their file, without the module's other imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    found.body = [node for node in found.body if isinstance(node, ast.FunctionDef) and node.name in names]
    found.bases, found.keywords, found.decorator_list = [], [], []
    prelude = ast.parse("import csv\n\ndef tqdm(iterable, *args, **kwargs):\n    return iterable\n")
    module = ast.Module(body=[*prelude.body, found], type_ignores=[])
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(module), str(path), "exec"), namespace)
    return namespace[class_name]


class Organisers:
    def __init__(self, repo: Path):
        for part in ("concept_detection/submission_check.py", "caption_prediction/submission_check.py",
                     "concept_detection/evaluator.py", "caption_prediction/evaluator.py"):
            if not (repo / part).is_file():
                raise errors.UserError(f"--organisers_repo {repo} has no {part}: give a checkout of "
                                       "taubsity/clef-caption-evaluation-2026")
        self.concept_check = load_module(repo / "concept_detection" / "submission_check.py", "organisers_check_c")
        self.caption_check = load_module(repo / "caption_prediction" / "submission_check.py", "organisers_check_k")
        try:
            self.concept_evaluator = load_module(repo / "concept_detection" / "evaluator.py", "organisers_concepts")
        except ImportError as e:
            raise errors.UserError(f"the organisers' concept scorer needs scikit-learn: {e}") from None
        self.caption_reader = load_methods(repo / "caption_prediction" / "evaluator.py", "CaptionEvaluator",
                                           ["load_gt", "load_predictions", "raise_exception"])

    def verdict(self, task: str, submission_csv: Path, reference: Path, scorer_gt: Path) -> Verdict:
        said = self.first_error(task, submission_csv, reference, scorer_gt)
        # The messages name the scratch folder: keep them the same from one run to the next.
        return Verdict(said is None, (said or "").replace(f"{submission_csv.parent}/", ""))

    def first_error(self, task: str, submission_csv: Path, reference: Path, scorer_gt: Path) -> str | None:
        """What the platform says first, in its order; None when it accepts the file."""
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                if task == "concepts":
                    self.concept_check.check_submission(str(submission_csv), str(reference), str(reference), "valid")
                else:
                    self.caption_check.check_submission(str(submission_csv), str(reference), "valid")
            except Exception as e:  # noqa: BLE001 (the platform stops at any exception)
                return "pre-check: " + describe(e)
            try:
                if task == "concepts":
                    evaluator = self.concept_evaluator.ConceptEvaluator(str(scorer_gt), str(scorer_gt))
                    evaluator._evaluate({"submission_file_path": str(submission_csv)})
                else:
                    reader = self.caption_reader()
                    reader.ground_truth_path = str(scorer_gt)
                    reader.gt = reader.load_gt()
                    reader.load_predictions(str(submission_csv))
            except Exception as e:  # noqa: BLE001
                return "scorer: " + describe(e)
        return None


def describe(error: BaseException) -> str:
    message = " ".join(str(error).split())
    if type(error).__name__ == "SubmissionFormatError":
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


# ---------------------------------------------------------------------------------------------
# The tool
# ---------------------------------------------------------------------------------------------


def tool_verdict(task: str, submission_csv: Path, reference: Path, role: str) -> Verdict:
    try:
        if role == "gt":
            report = submission.validate_file(task, submission_csv, None, ground_truth=reference)
        else:
            report = submission.validate_file(task, submission_csv, reference)
    except errors.UserError as e:
        return Verdict(False, f"error: {e}")
    return Verdict(report.accepted, " | ".join(report.errors))


# What the platform's first message is about, and the words of the tool's messages that name the same thing.
REASONS: list[tuple[str, str, str]] = [
    # (reason, the platform's message, the tool's message)
    ("encoding", r"encoding error|UnicodeDecodeError", r"not UTF-8|BOM"),
    ("blank line", r"Empty line detected", r"blank line"),
    ("header", r"header", r"header|BOM|the file is empty"),
    ("fields", r"Expected exactly 2 columns|Wrong format|IndexError", r"\d+ fields?;|field"),
    ("whitespace around the ID", r"ID has leading/trailing whitespace", r"whitespace around the ID|row without an ID"),
    ("whitespace around the CUIs", r"CUIs field has leading", r"whitespace around the CUIs"),
    ("duplicate ID", r"Duplicate ID detected|more than once in submission", r"duplicate image ID|twice"),
    ("ID order", r"ID order mismatch|Extra ID beyond", r"ID order|unknown image ID|row without an ID"),
    ("unknown ID", r"not (found )?in \w+ ground truth|does not exist in testset", r"unknown image ID|ID order"),
    ("missing ID", r"Submission incomplete|Number of image IDs", r"missing|ID order"),
    ("empty CUI", r"Empty CUI", r"empty CUI"),
    ("CUI format", r"Invalid CUI format", r"not a CUI"),
    ("CUI twice", r"Duplicate CUIs|Same concept", r"concept repeated"),
    ("too many CUIs", r"Too Many concepts", r"at most 100"),
    ("quotes", r"not enclosed in double quotes", r"double quotes"),
    ("CSV", r"CSV parsing error", r"readable CSV"),
    ("ground truth", r"scorer: (ZeroDivisionError|Exception: Answer file|IndexError)|Ground truth file header",
     r"ground truth|ID list|lists no image|no image would be scored"),
]
# A tool message that blames the ground truth or ID list: the right reason when that file is not the clean one.
BLAMES_THE_REFERENCE = r"^(error: )?(ground truth|ID list) "


def same_reason(case: Case, platform: str, tool: str) -> bool:
    if case.reference not in (ground_truth(case.task, IDS), id_list(case.task, IDS)) and re.search(
            BLAMES_THE_REFERENCE, tool):
        return True
    wanted = [tool_words for _, platform_words, tool_words in REASONS if re.search(platform_words, platform)]
    return any(re.search(words, tool) for words in wanted)


# ---------------------------------------------------------------------------------------------
# Running both
# ---------------------------------------------------------------------------------------------


def run(organisers: Organisers, cases: list[Case], folder: Path,
        tool: Callable[[str, Path, Path, str], Verdict] = tool_verdict) -> list[tuple[Case, Verdict, Verdict]]:
    results = []
    for number, case in enumerate(cases):
        where = folder / f"{number:04d}"
        where.mkdir(parents=True, exist_ok=True)
        submission_csv, reference, scorer_gt = where / "submission.csv", where / "reference.csv", where / "scored.csv"
        submission_csv.write_bytes(case.submission)
        reference.write_bytes(case.reference)
        scorer_gt.write_bytes(case.scorer_gt)
        (where / "name.txt").write_text(f"{case.task}: {case.name} ({case.role})\n", encoding="utf-8")
        results.append((case, organisers.verdict(case.task, submission_csv, reference, scorer_gt),
                        tool(case.task, submission_csv, reference, case.role)))
    return results


def encoded(data: bytes) -> dict[str, str]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


CASE_COLUMNS = ["task", "role", "name", "submission", "reference", "platform", "message"]
MESSAGE_KEPT = 150  # characters of the platform's message kept in a recording: enough to see what it said


def record(results: list[tuple[Case, Verdict, Verdict]], path: Path) -> None:
    """The corpus and the platform's verdicts: every distinct file once, then one case per line."""
    files: dict[str, dict[str, str]] = {}

    def key(data: bytes) -> str:
        name = hashlib.sha256(data).hexdigest()[:10]
        files.setdefault(name, encoded(data))
        return name

    rows = [[case.task, case.role, case.name, key(case.submission), key(case.reference),
             "accepted" if platform.accepted else "rejected", platform.message[:MESSAGE_KEPT]]
            for case, platform, _ in results]
    lines = ["{", '"recorded_with": "benchmarks/platform_agreement.py and taubsity/clef-caption-evaluation-2026",',
             '"files": {']
    lines += [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in files.items()]
    lines[-1] = lines[-1].rstrip(",")
    lines += ["},", f'"columns": {json.dumps(CASE_COLUMNS)},', '"cases": [']
    lines += [f"  {json.dumps(r, ensure_ascii=False)}," for r in rows]
    lines[-1] = lines[-1].rstrip(",")
    lines += ["]", "}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def table(results: list[tuple[Case, Verdict, Verdict]]) -> None:
    print("| task | files | agree | disagree | tool accepts, platform rejects | both reject: same reason |")
    print("|---|---|---|---|---|---|")
    for task in ("concepts", "captions", "all"):
        rows = [r for r in results if task in ("all", r[0].task)]
        agree = sum(p.accepted == t.accepted for _, p, t in rows)
        dangerous = sum(t.accepted and not p.accepted for _, p, t in rows)
        both = [(c, p, t) for c, p, t in rows if not p.accepted and not t.accepted]
        same = sum(same_reason(c, p.message, t.message) for c, p, t in both)
        print(f"| {task} | {len(rows)} | {agree} | {len(rows) - agree} | {dangerous} | {same} of {len(both)} |")
    disagreements = [r for r in results if r[1].accepted != r[2].accepted]
    if disagreements:
        print("\nDisagreements:")
    for case, platform, tool in disagreements:
        print(f"- {case.task}: {case.name} [{case.role}]\n    platform: "
              f"{'accepted' if platform.accepted else 'REJECTED, ' + platform.message}\n    tool:     "
              f"{'accepted' if tool.accepted else 'REJECTED, ' + tool.message[:300]}")
    other = [(c, p, t) for c, p, t in results if not p.accepted and not t.accepted
             and not same_reason(c, p.message, t.message)]
    if other:
        print("\nBoth reject, for reasons the table of reasons does not match:")
    for case, platform, tool in other:
        print(f"- {case.task}: {case.name} [{case.role}]\n    platform: {platform.message}\n    tool:     "
              f"{tool.message[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organisers_repo", required=True, help="checkout of taubsity/clef-caption-evaluation-2026")
    parser.add_argument("--record", help="write the corpus and the platform's verdicts to this JSON file")
    parser.add_argument("--keep", help="write the corpus here (one folder per file) instead of a temporary folder")
    parser.add_argument("--random", type=int, default=0, metavar="N", help="also N files with random edits (not "
                        "recorded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random edits")
    args = parser.parse_args(argv)
    organisers = Organisers(Path(args.organisers_repo))
    cases = corpus() + random_cases(args.random, args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        results = run(organisers, cases, Path(args.keep or scratch))
    print(f"Python {sys.version.split()[0]}; {len(cases)} files; the organisers' code from {args.organisers_repo}\n")
    table(results)
    if args.record:
        record([r for r in results if not r[0].name.startswith("random ")], Path(args.record))
        print(f"\nrecorded: {args.record}")
    return 0 if all(p.accepted == t.accepted for _, p, t in results) else 1


if __name__ == "__main__":
    sys.exit(errors.run_cli(main, hint=""))
