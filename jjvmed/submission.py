"""The organisers' file rules: reading submissions, the pre-check the upload platform runs, the upload zip.

Two sets of rules:
- "2026" (the default): every rejection rule of the 2026 pre-check (header exactly `ID,CUIs` /
  `ID,Caption`, two fields on every row, no whitespace around IDs and CUIs, no blank line, UTF-8
  without BOM, CUIs shaped `C` + digits, quoted captions with commas, rows in exactly the order of
  the expected ID list), plus what the scorer that runs after it refuses (more than 100 concepts,
  except on a row it skips because its ID contains 'ID'; a file where it would score no image). The
  expected IDs are read from an ID list as the pre-check reads it, and a ground truth is also read
  as the scorer reads it. benchmarks/platform_agreement.py runs the organisers' own code beside
  this on hundreds of edge-case files: the verdicts agree on every one.
- "2025": the older, more lenient reader (any row whose first field contains 'ID' is a header, a
  bare `ID` row is allowed, order is free), for files made for earlier editions.

All violations are reported, each with its line number; the platform itself stops at the first.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import errors, files
from .images import list_images

RULES = ("2026", "2025")
TASKS = ("concepts", "captions")
HEADERS = {"concepts": ["ID", "CUIs"], "captions": ["ID", "Caption"]}
MAX_CONCEPTS = 100  # CUIs per image; the platform rejects a row with more
CUI_SHAPE = re.compile(r"^C[0-9]{7}$")  # a UMLS CUI (ASCII digits; \d also takes other scripts' digits)
CUI_2026 = re.compile(r"C\d+")  # what the 2026 pre-check accepts (case-sensitive, any number of digits)
# Characters str.splitlines() breaks at besides \r and \n. The pre-check finds blank lines and pairs rows
# with raw lines through splitlines(), while the csv reader does not break there.
ODD_LINE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
ZIP_MEMBER = "submission.csv"
ZIP_EARLIEST = 315_619_200  # 1980-01-02: zip dates cannot be older than 1980

Rows = list[tuple[int, list[str]]]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 problem', '2 problems'."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def verb(count: int, singular: str, plural_form: str) -> str:
    return singular if count == 1 else plural_form


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)  # the platform would reject the file
    warnings: list[str] = field(default_factory=list)  # accepted, but probably not what you meant
    rules: str = "2026"

    @property
    def accepted(self) -> bool:
        return not self.errors


# ---------------------------------------------------------------------------------------------
# Reading files the way the official scorer does (also the 2025 rules' reader)
# ---------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> Rows:
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
    return bool(fields) and "ID" in fields[0]  # the official concept reader's rule, for any row


def concept_pairs(rows: Rows) -> dict[str, tuple[str, ...]]:
    """ID -> concepts, as the official reader builds them (empty items kept, not yet upper-cased)."""
    pairs: dict[str, tuple[str, ...]] = {}
    for _, fields in rows:
        if not fields or is_header(fields) or len(fields) > 2:
            continue
        pairs[fields[0]] = tuple(c.strip() for c in fields[1].split(";")) if len(fields) == 2 else ()
    return pairs


def caption_pairs(rows: Rows) -> dict[str, str]:
    """ID -> caption: the second field, as the official reader keeps it."""
    return {fields[0]: fields[1] for _, fields in rows if len(fields) >= 2 and not is_header(fields)}


# ---------------------------------------------------------------------------------------------
# The expected IDs
# ---------------------------------------------------------------------------------------------

# The one rule for the header of an ID list or ground truth (the same sentence is in the docstrings below,
# the help texts and the README):
# The first row is the header and is never read as an ID, whatever it holds (`ID,CUIs`, `image_id,caption`),
# as on the platform; a first row whose first field holds a digit is refused, because it is then an image ID
# that the platform would silently drop.


def read_records(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every CSV record of an ID list or ground truth, decoded as UTF-8 (a BOM is kept)."""
    if not path.is_file():
        raise errors.UserError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.UserError(f"{what} {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    try:
        for fields in reader:
            records.append((reader.line_num, fields))
    except csv.Error as e:
        raise errors.UserError(f"{what} {path} is not a readable CSV: {e}") from None
    return records


def check_header_row(records: list[tuple[int, list[str]]], path: Path, what: str) -> None:
    """The header rule (see above): the first row is the header; refused when it is blank or an image ID."""
    if not records:
        raise errors.UserError(f"{what} {path} is empty; its first row must be the header (ID,...)")
    line, fields = records[0]
    if not fields:
        raise errors.UserError(f"{what} {path}: line {line} is blank; the first row must be the header (ID,...), "
                               "as the platform reads it")
    if any(c.isdigit() for c in fields[0]):
        raise errors.UserError(f"{what} {path}: the first row starts with {fields[0]!r}, which looks like an image "
                               "ID, but the first row is the header, which the platform skips whatever it holds: add "
                               "a header row ID above it")


# The header rule of an ID list, said once: the docstring below, --ids_csv's help and the README use it.
ID_LIST_HEADER_RULE = ("its first row is the header and is never read as an ID, whatever it holds (ID,CUIs, "
                       "image_id,caption), as on the platform; a first row whose first field holds a digit is "
                       "refused: it would be an image ID the platform silently drops")


def read_id_list(path: str | Path) -> list[str]:
    """The expected IDs, in the file's order: the first column of the organisers' ids.csv or a ground truth.

    The first row is the header and is never read as an ID, whatever it holds (`ID,CUIs`, `image_id,caption`),
    as on the platform; a first row whose first field holds a digit is refused, because it is then an image ID
    that the platform would silently drop. IDs are stripped and blank rows skipped, as the organisers' own
    reader does; a UTF-8 BOM is tolerated; an ID listed twice is refused. The order is kept exactly: the 2026
    pre-check wants the rows in this order.
    """
    path = Path(path)
    records = read_records(path, "ID list")
    check_header_row(records, path, "ID list")
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for line, fields in records[1:]:
        image_id = fields[0].strip() if fields else ""
        if not image_id:
            continue
        if image_id in first_line:
            raise errors.UserError(f"ID list {path}: image ID {image_id!r} is listed twice (lines "
                                   f"{first_line[image_id]} and {line})")
        first_line[image_id] = line
        ids.append(image_id)
    if not ids:
        raise errors.UserError(f"ID list {path} lists no image IDs")
    return ids


def in_id_list_order(pairs: list[tuple[str, Any]], ids_csv: str | Path, where: str) -> tuple[list[tuple[str, Any]],
                                                                                             list[str]]:
    """`pairs` (ID first) in exactly the order of the ID list, and the IDs the list does not name.

    A listed ID missing from `pairs` is an error naming how many and the first few: the platform
    rejects a file without it.
    """
    wanted = read_id_list(ids_csv)
    by_id = dict(pairs)
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise errors.UserError(f"{len(missing)} of the {plural(len(wanted), 'ID')} in {ids_csv} "
                               f"{'has' if len(missing) == 1 else 'have'} no {where} (first: {', '.join(missing[:5])})")
    listed = set(wanted)
    return [(i, by_id[i]) for i in wanted], [i for i, _ in pairs if i not in listed]


def expected_ids(source: str | Path) -> list[str]:
    """Image IDs from a ground-truth/ID CSV (first column, its order) or an image folder (natural order).

    The first row is the header and is never read as an ID, whatever it holds (`ID,CUIs`, `image_id,caption`),
    as on the platform; a first row whose first field holds a digit is refused, because it is then an image ID
    that the platform would silently drop.
    """
    source = Path(source)
    if source.is_dir():
        return [i for i, _ in list_images(source)]
    return read_id_list(source)


@dataclass
class Expected:
    """The IDs the platform expects, in its order, and what the file they come from does to every submission."""
    ids: list[str]
    errors: list[str] = field(default_factory=list)  # the platform rejects every file checked against it
    warnings: list[str] = field(default_factory=list)


def read_expected(task: str, path: Path, scored: bool) -> Expected:
    """An ID list or ground truth read exactly as the platform reads it for `task`.

    The pre-check takes the first column of every row after the first, stripped, blank rows skipped (the
    concept check also drops repeats; the caption check keeps them, and then wants the ID again at that
    place). With `scored`, the file is also the ground truth the organisers' scorer reads, unstripped and
    with its own header rule: what would make it fail, or disagree with the pre-check on the IDs, is an
    error, since no file could then be scored.
    """
    what = "ground truth" if scored else "ID list"
    records = read_records(path, what)
    check_header_row(records, path, what)
    found = Expected(ids=[])
    first_line: dict[str, int] = {}
    for line, fields in records[1:]:
        if not fields:
            if scored:
                found.errors.append(f"{what} {path} line {line}: blank row; the organisers' {task[:-1]} scorer stops "
                                    "at it (IndexError), so no file can be scored against this ground truth")
            continue
        image_id = fields[0].strip()
        if image_id in first_line:
            if task == "concepts":
                found.warnings.append(f"{what} {path} line {line}: {image_id!r} is listed again (first on line "
                                      f"{first_line[image_id]}); the platform keeps the first")
                continue
            found.warnings.append(f"{what} {path} line {line}: {image_id!r} is listed again (first on line "
                                  f"{first_line[image_id]}); the platform's caption check wants every row at its "
                                  "place in the list, repeats included")
        elif not image_id:
            found.warnings.append(f"{what} {path} line {line}: a row without an image ID; the platform expects the "
                                  "ID '' at its place")
        first_line.setdefault(image_id, line)
        found.ids.append(image_id)
    if not found.ids:
        found.warnings.append(f"{what} {path} lists no image IDs; the platform then refuses every row")
    if scored:
        found.errors += scorer_problems(task, records, found.ids, f"{what} {path}")
    return found


def scorer_problems(task: str, records: list[tuple[int, list[str]]], ids: list[str], name: str) -> list[str]:
    """Why the organisers' scorer, reading this ground truth, would fail or disagree with the pre-check's IDs.

    The scorers read the ground truth unstripped. The concept scorer skips every row whose first field holds
    'ID' (the header and any such image) and refuses a row without a second field; the caption scorer skips
    the first row only when its first field is 'ID' in any letter case, and fails on a row without a second
    field. After the pre-check passed, a file holds exactly the pre-check's IDs; the scorer then wants them
    to be its own IDs, no more, no fewer.
    """
    problems = []
    read: dict[str, int] = {}  # the scorer's IDs -> line
    for index, (line, fields) in enumerate(records):
        if not fields:
            continue  # a blank row: reported by the caller
        if task == "concepts":
            if "ID" in fields[0]:
                continue
            if len(fields) == 1:
                problems.append(f"{name} line {line}: no second field after {fields[0]!r}; the organisers' concept "
                                "scorer refuses such a ground truth ('Answer file format is wrong')")
                continue
        else:
            if index == 0 and fields[0].lower() == "id":
                continue
            if len(fields) == 1:
                problems.append(f"{name} line {line}: no second field after {fields[0]!r}; the organisers' caption "
                                "scorer stops at it (IndexError)")
                continue
        read.setdefault(fields[0], line)
    wanted = [i for i in dict.fromkeys(ids) if task == "captions" or "ID" not in i]
    wanted_set = set(wanted)
    explained = set()
    for image_id, line in read.items():
        if image_id in wanted_set:
            continue
        if line == records[0][0]:
            rule = ("skips only rows whose first field holds 'ID'" if task == "concepts" else
                    "skips the first row only when its first field is 'ID' in any letter case, and nothing else")
            problems.append(f"{name} line {line}: the organisers' {task[:-1]} scorer reads the header "
                            f"{image_id!r} as an image (it {rule}), so no file can be scored against it")
        elif image_id.strip() in wanted_set:
            explained.add(image_id.strip())
            problems.append(f"{name} line {line}: whitespace around the ID {image_id!r}; the pre-check strips it "
                            "and the scorer does not, so no file can pass both")
        else:
            problems.append(f"{name} line {line}: the scorer reads the image {image_id!r}, which the pre-check "
                            "does not expect")
    unread = [i for i in wanted if i not in read and i not in explained]
    if unread:
        problems.append(f"{name}: the scorer does not read {plural(len(unread), 'expected ID')} "
                        f"({', '.join(repr(i) for i in unread[:5])}), so no file can pass both")
    return problems


# ---------------------------------------------------------------------------------------------
# The 2025 rules: the official scorer's reader, all violations
# ---------------------------------------------------------------------------------------------


def check_ids(rows: Rows, expected: list[str] | None, report: Report) -> None:
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
        report.errors.append(f"{plural(len(header_like), 'image ID')} {verb(len(header_like), 'contains', 'contain')}"
                             f" 'ID', so the evaluator skips their rows as headers: {', '.join(header_like[:5])}")
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        report.errors.append(f"{plural(len(seen), 'image ID')} but the test set has {len(expected)}: "
                             f"{len(missing)} missing ({shown})")


def data_rows(rows: Rows, report: Report) -> Iterator[tuple[int, list[str]]]:
    """The rows the evaluator reads as data: blank lines are reported, header-like rows skipped."""
    for line, fields in rows:
        if not fields:
            report.errors.append(f"line {line}: blank line")
        elif not is_header(fields):
            yield line, fields


def validate_concepts(rows: Rows, expected: list[str] | None) -> Report:
    """The 2025 rules for a concept file."""
    report = Report(rules="2025")
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


def validate_captions(rows: Rows, expected: list[str] | None) -> Report:
    """The 2025 rules for a caption file."""
    report = Report(rules="2025")
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


# ---------------------------------------------------------------------------------------------
# The 2026 rules: the platform's pre-check, line by line, all violations
# ---------------------------------------------------------------------------------------------


def decode_2026(data: bytes, problems: list[tuple[int, str]]) -> str:
    """The file's text as the pre-check reads it; a BOM or bytes that are not UTF-8 are reported, then
    set aside so the rest of the file is still checked."""
    if data.startswith(codecs.BOM_UTF8):
        problems.append((1, "line 1: the file starts with a UTF-8 BOM, which the platform reads as part of the "
                            "header: save it as UTF-8 without BOM"))
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        problems.append((line, f"line {line}: not UTF-8 (byte {e.start}); save the file as UTF-8"))
        return data.decode("utf-8", errors="replace")


def parse_records(text: str, problems: list[tuple[int, str]]) -> list[tuple[int, int, list[str]]]:
    """(first line, last line, fields) of every CSV record, as the pre-check's csv reader yields them."""
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    try:
        for fields in reader:
            first = records[-1][1] + 1 if records else 1
            records.append((first, reader.line_num, fields))
    except csv.Error as e:
        line = (records[-1][1] + 1) if records else 1
        problems.append((line, f"line {line}: not a readable CSV: {e}"))
    return records


def check_row_2026(task: str, line: int, fields: list[str], raw: str | None, raw_line: int,
                   problems: list[tuple[int, str]], warnings: list[str]) -> None:
    """The pre-check's per-row format rules (the ID rules are checked over the whole file).

    `raw` is the text line the pre-check pairs with this row (line number `raw_line`), which is the
    row's own line unless a row above spans several lines.
    """
    image_id = fields[0]
    columns = ",".join(HEADERS[task])
    if len(fields) != 2:
        count = plural(len(fields), "field")
        if len(fields) == 1:
            hint = ("write 'ID,' for an image with no concept" if task == "concepts"
                    else "write 'ID,' for an empty caption")
        else:
            hint = ("separate CUIs with ';', not ','" if task == "concepts"
                    else "a caption that contains a comma must be enclosed in double quotes")
        problems.append((line, f"line {line}: {count}; every row is exactly {columns} ({hint})"))
    if image_id != image_id.strip():
        problems.append((line, f"line {line}: whitespace around the ID {image_id!r}"))
    if len(fields) != 2:
        return
    value = fields[1]
    if task == "captions":
        # The pre-check looks at the raw line, not the parsed field: the text after the first comma
        # must start and end with a double quote when it holds another comma.
        after = raw.split(",", 1)[1] if raw is not None and "," in raw else None
        if after and "," in after and not (after.startswith('"') and after.endswith('"')):
            shifted = (f" (the platform checks line {raw_line} of the file for this row: a row above spans several "
                       "lines)" if raw_line != line else "")
            problems.append((line, f"line {line}: the caption contains a comma but is not enclosed in double "
                                   f"quotes{shifted}"))
        if not value.strip():
            warnings.append(f"line {line}: empty caption for {image_id.strip()!r}")
        return
    if value != value.strip():
        problems.append((line, f"line {line}: whitespace around the CUIs field for {image_id.strip()!r}"))
    if not value.strip():
        return  # an empty CUIs field is allowed
    parts = [p.strip() for p in value.split(";")]
    if any(not p for p in parts):
        problems.append((line, f"line {line}: empty CUI for {image_id.strip()!r} (a trailing ';' or ';;')"))
    invalid = [p for p in parts if p and not CUI_2026.fullmatch(p)]
    if invalid:
        problems.append((line, f"line {line}: not a CUI (an upper-case C followed by digits): "
                               f"{', '.join(repr(p) for p in invalid[:5])}"))
    dupes = sorted({p for p in parts if p and parts.count(p) > 1})
    if dupes:
        problems.append((line, f"line {line}: concept repeated for {image_id.strip()!r}: {', '.join(dupes)}"))
    # The scoring step after the pre-check rejects more than 100, except on a row it skips as a header.
    if len(parts) > MAX_CONCEPTS and "ID" not in image_id:
        problems.append((line, f"line {line}: {len(parts)} concepts for {image_id.strip()!r}; at most "
                               f"{MAX_CONCEPTS} (the scoring step rejects the file)"))
    odd = [p for p in parts if CUI_2026.fullmatch(p) and not CUI_SHAPE.match(p)]
    if odd:
        warnings.append(f"line {line}: accepted, but not a 7-digit UMLS CUI: {', '.join(odd[:5])}")


def check_ids_2026(task: str, ids: list[tuple[int, str]], expected: list[str] | None,
                   problems: list[tuple[int, str]], file_problems: list[str], warnings: list[str]) -> None:
    """Every expected ID once, none unknown, in exactly the expected order; what the concept scorer skips.

    As on the platform, the n-th distinct ID of the file is compared with the n-th entry of the expected
    list (repeats in the list included) and the file must hold every listed ID.
    """
    first_line: dict[str, int] = {}
    unique: list[tuple[int, str]] = []
    for line, image_id in ids:
        if image_id in first_line:
            problems.append((line, f"line {line}: duplicate image ID {image_id!r} (first on line "
                                   f"{first_line[image_id]})"))
            continue
        first_line[image_id] = line
        unique.append((line, image_id))
    if task == "concepts":
        # The concept scorer reads a row whose ID holds 'ID' as a header, in the file and in the ground truth
        # alike: such images are left out of the score, and with none left it divides by zero.
        listed = expected if expected is not None else [i for _, i in unique]
        skipped = [i for i in dict.fromkeys(listed) if "ID" in i]
        if listed and len(skipped) == len(set(listed)):
            file_problems.append("no image would be scored: the concept scorer takes every row whose ID contains 'ID' "
                                 "for a header, and all the image IDs here contain 'ID' (it then fails)")
        elif skipped:
            warnings.append(f"{plural(len(skipped), 'image ID')} {verb(len(skipped), 'contains', 'contain')} 'ID', so "
                            f"the concept scorer skips {verb(len(skipped), 'its row', 'their rows')} as headers and "
                            f"{verb(len(skipped), 'it is', 'they are')} not scored: {', '.join(skipped[:5])}")
    if expected is None:
        return
    expected_set = set(expected)
    for line, image_id in unique:
        if image_id not in expected_set:
            problems.append((line, f"line {line}: unknown image ID {image_id!r}"))
    out_of_place = [(line, position, image_id) for position, (line, image_id) in enumerate(unique)
                    if position >= len(expected) or expected[position] != image_id]
    if out_of_place:
        line, position, image_id = out_of_place[0]
        wanted = repr(expected[position]) if position < len(expected) else "no further ID"
        problems.append((line, f"line {line}: ID order: expected {wanted} at position {position + 1}, found "
                               f"{image_id!r}; {len(out_of_place)} of {plural(len(unique), 'row')} "
                               f"{verb(len(out_of_place), 'is', 'are')} out of place (rows must follow the order of "
                               "the expected ID list exactly)"))
    distinct = list(dict.fromkeys(expected))
    missing = [i for i in distinct if i not in first_line]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        file_problems.append(f"{len(missing)} of the {plural(len(distinct), 'expected image ID')} "
                             f"{verb(len(missing), 'is', 'are')} missing ({shown})")


def validate_2026(task: str, path: str | Path, expected: list[str] | None) -> Report:
    """Every rejection rule of the 2026 pre-check, with line numbers; see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise errors.UserError(f"{path} does not exist")
    problems: list[tuple[int, str]] = []
    file_problems: list[str] = []
    warnings: list[str] = []
    text = decode_2026(path.read_bytes(), problems)
    lines = text.splitlines()
    # The pre-check's blank-line rule, as written: any line after the first that is empty or only
    # whitespace (a line equal to the first one is exempt).
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip() and raw != lines[0]:
            problems.append((number, f"line {number}: blank line"))
    # The csv reader's lines, ends kept (it breaks only at CR, LF and CRLF): what each record was written as.
    csv_lines = list(io.StringIO(text, newline=""))
    records = parse_records(text, problems)
    header = HEADERS[task]
    if not records:
        problems.append((1, f"line 1: the file is empty; the first line must be the header {','.join(header)}"))
    elif records[0][2] != header:
        problems.append((1, f"line 1: the header row must be {','.join(header)}"))
    expected_set = set(expected or [])
    ids: list[tuple[int, str]] = []
    for index, (line, last, fields) in enumerate(records[1:], start=1):
        source = "".join(csv_lines[line - 1:last]).rstrip("\r\n")
        if not source.strip():
            continue  # blank lines, reported above
        if not "".join(fields).strip():
            # A record of quotes around nothing but whitespace (or a lone quote): not a blank line, so the
            # pre-check reads it as a row and rejects its field count. It names no image: no ID check.
            problems.append((line, f"line {line}: {source!r} is a row without an ID ({plural(len(fields), 'field')}, "
                                   "blank); every row is exactly " + ",".join(header) + ": delete it"))
            continue
        if last > line:
            warnings.append(f"line {line}: a line break inside a field; the platform checks the file line by line, "
                            "so keep every row on one line")
        odd = sorted({f"U+{ord(c):04X}" for value in fields for c in value if c in ODD_LINE_BREAKS})
        if odd:
            warnings.append(f"line {line}: {', '.join(odd)}, which the platform's checks count as a line break; "
                            "remove it")
        # The pre-check pairs the n-th record with the n-th raw line (it assumes one line per row).
        raw = lines[index] if index < len(lines) else None
        check_row_2026(task, line, fields, raw, index + 1, problems, warnings)
        # An ID with whitespace around it is reported once, above; for the ID checks take the ID it was
        # meant to be, so that one stray space does not also make it unknown, out of place and missing.
        image_id = fields[0]
        ids.append((line, image_id if image_id in expected_set else image_id.strip()))
    check_ids_2026(task, ids, expected, problems, file_problems, warnings)
    problems.sort(key=lambda p: p[0])  # stable: the order found within a line is kept
    return Report(errors=[message for _, message in problems] + file_problems, warnings=warnings, rules="2026")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def validate_file(task: str, path: str | Path, expected: list[str] | str | Path | None, rules: str = "2026",
                  ground_truth: str | Path | None = None) -> Report:
    """Check a submission file against the organisers' rules.

    `expected`: the IDs the platform expects, in its order: a list; a file, the organisers' ID list
    (ids.csv), read exactly as the platform's pre-check reads it for this task; or a folder of images
    (natural order). None skips the ID set and order checks, unless `ground_truth` is given.
    `ground_truth`: the file the platform scores against, when you have it (the validation set): its
    IDs are the expected ones when `expected` is None, and what in it would stop the organisers'
    scorer is reported too (no file could be scored against it).
    For both files: the first row is the header and is never read as an ID, whatever it holds
    (`ID,CUIs`, `image_id,caption`), as on the platform; a first row whose first field holds a digit is
    refused, because it is then an image ID that the platform would silently drop.
    """
    if task not in TASKS:
        raise errors.UserError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    if rules not in RULES:
        raise errors.UserError(f"unknown rules {rules!r}; one of {', '.join(RULES)}")
    found = Expected(ids=[])
    if ground_truth is not None and rules == "2026":
        scored = read_expected(task, Path(ground_truth), scored=True)
        found.errors += scored.errors
        found.warnings += scored.warnings
        if expected is None:
            expected = scored.ids
    elif ground_truth is not None and expected is None:
        expected = read_id_list(ground_truth)
    if isinstance(expected, str | Path):
        if Path(expected).is_dir() or rules == "2025":
            expected = expected_ids(expected)
        else:
            listed = read_expected(task, Path(expected), scored=False)
            found.errors += listed.errors
            found.warnings += listed.warnings
            expected = listed.ids
    if rules == "2026":
        report = validate_2026(task, path, expected)
    else:
        rows = read_rows(path)
        report = validate_concepts(rows, expected) if task == "concepts" else validate_captions(rows, expected)
    return Report(errors=found.errors + report.errors, warnings=found.warnings + report.warnings, rules=report.rules)


def log_report(report: Report, name: str, limit: int = 50) -> None:
    verdict = "accepted" if report.accepted else f"REJECTED ({plural(len(report.errors), 'problem')})"
    lines = [f"{name}: the official checks say {verdict} ({report.rules} rules)"]
    lines += [f"  error: {e}" for e in report.errors[:limit]]
    if len(report.errors) > limit:
        lines.append(f"  ... and {plural(len(report.errors) - limit, 'more error')}")
    lines += [f"  warning: {w}" for w in report.warnings[:limit]]
    if len(report.warnings) > limit:
        lines.append(f"  ... and {plural(len(report.warnings) - limit, 'more warning')}")
    errors.log("\n".join(lines))


def check_zip_path(zip_path: str | Path) -> None:
    """Called before a run too, so a misnamed --zip fails at once and not after the night's work."""
    if Path(zip_path).suffix.lower() != ".zip":
        raise errors.UserError(f"the upload file must end in .zip, not {Path(zip_path).name!r}")


def write_zip(csv_path: str | Path, zip_path: str | Path) -> Path:
    """The upload: a zip holding only `submission.csv`, the CSV's bytes unchanged, written atomically."""
    csv_path, zip_path = Path(csv_path), Path(zip_path)
    if not csv_path.is_file():
        raise errors.UserError(f"{csv_path} does not exist")
    check_zip_path(zip_path)
    data = csv_path.read_bytes()
    info = zipfile.ZipInfo(ZIP_MEMBER, date_time=time.localtime(max(csv_path.stat().st_mtime, ZIP_EARLIEST))[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16  # a plain readable file when unpacked
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, data)
    return files.write_bytes_atomic(zip_path, buffer.getvalue())
