"""Tables of training data and of answers read back: `ID,<column>` CSVs such as `ID,Caption`, `ID,CUIs` and
format A's `ID,Concepts`, read by one rule.

The columns are found by their header, in any case and order; a file without them, or not in UTF-8, is one
line naming what is wrong. Submissions and ground truths are read instead as the organisers' code reads them
(submission.read_rows and its *_pairs), so a local score is the official one: read_concept_csv reads the
ground-truth concepts tuning scores against.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from .errors import UserError
from .submission import concept_pairs, is_header, read_rows


def read_id_table(path: str | Path, column: str) -> dict[str, str]:
    """ID -> the `column` field of every row, in file order (a row without that field gives '').

    An unquoted comma inside the last column ("Foramen Ovale, Patent", a caption) splits it: it is joined
    back. A UTF-8 BOM is allowed; blank rows are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        lower = [h.casefold() for h in header]
        if "id" not in lower or column.casefold() not in lower:
            raise UserError(f"{path} needs a header row with the columns ID,{column}; its first row is: "
                            f"{','.join(header) or '(blank)'}")
        id_col, value_col = lower.index("id"), lower.index(column.casefold())
        last = value_col == len(header) - 1
        rows: dict[str, str] = {}
        for row in reader:
            if not row:
                continue
            rows[row[id_col]] = ",".join(row[value_col:]) if last else (row[value_col] if len(row) > value_col else "")
        return rows
    except csv.Error as e:
        raise UserError(f"{path} is not a readable CSV (line {reader.line_num}: {e})") from None


def read_cui_lists(path: str | Path) -> dict[str, list[str]]:
    """ID -> the CUIs of an `ID,CUIs` table (joined by ';'): upper-cased, without empty items or repeats."""
    return {image_id: list(dict.fromkeys(c.strip().upper() for c in field.split(";") if c.strip()))
            for image_id, field in read_id_table(path, "CUIs").items()}


def read_concept_csv(path: str | Path) -> dict[str, tuple[str, ...]]:
    """ID -> concepts exactly as the official reader builds them (for ground truth)."""
    rows = read_rows(path)
    header = next((fields for _, fields in rows if fields), [])
    if is_header(header) and [h.strip().casefold() for h in header] != ["id", "cuis"]:
        raise UserError(f"{path} needs the header ID,CUIs (a concepts file); its first row is: {','.join(header)}")
    pairs = concept_pairs(rows)
    if not pairs:
        raise UserError(f"{path} has no ID,CUIs rows")
    items = [c for cuis in pairs.values() for c in cuis if c]
    if items and not any(re.fullmatch(r"[Cc]\d+", c) for c in items):
        raise UserError(f"{path} holds no CUIs (C followed by digits) in its second column, e.g. {items[0][:40]!r}: "
                        "give the ID,CUIs file")
    return pairs
