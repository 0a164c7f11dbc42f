"""Every file the tool writes goes through here: whole or not at all, readable by colleagues."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write to a temp file beside `path`, fsync, then rename: readers never see half a file.

    mkstemp creates files with mode 0600; the final file gets the mode a plain open() would give
    (0666 minus the umask), so colleagues on a shared project folder can read the submission.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: str | Path, header: list[str] | None, rows: Iterable[list[str]]) -> Path:
    """A CSV with '\\n' line ends, fields quoted only where needed (commas, quotes, newlines)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))
