"""The append-only journal of raw generations: the single source of truth for the CSVs.

One JSON line per image, appended after every batch; the first line records the settings that
decide the text, so a resume with other settings is refused. A torn last line (a kill mid-write)
is dropped and redone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from errors import UserError, log

JOURNAL_VERSION = 1

def default_journal_path(output_csv: str | Path, checkpoint_dir: str | None, suffix: str = "") -> Path:
    out = Path(output_csv)
    folder = Path(checkpoint_dir) if checkpoint_dir else out.parent
    return folder / f"{out.stem}{suffix}.journal.jsonl"


def read_journal(path: Path) -> tuple[dict, dict[str, dict], int]:
    """(header, last record per ID, byte length of the intact part). A torn last line is ignored."""
    header: dict | None = None
    records: dict[str, dict] = {}
    good_bytes = 0
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if not raw.strip():
            good_bytes += len(raw) + (0 if is_last else 1)
            continue
        try:
            entry = json.loads(raw)
            if is_last:
                raise ValueError("no newline: the write was cut off")
        except ValueError:
            if is_last:
                break  # torn tail of a killed run; it is cut off before appending
            raise UserError(f"checkpoint journal {path} is damaged at line {number}; move it away to start over") \
                from None
        if header is None:
            if entry.get("journal") != "jj-vmed":
                raise UserError(f"{path} is not a JJ-VMed checkpoint journal")
            header = entry
        else:
            records[entry["id"]] = entry
        good_bytes += len(raw) + 1
    if header is None:
        raise UserError(f"checkpoint journal {path} is empty; delete it to start over")
    return header, records, good_bytes


def settings_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Journal:
    """Appends one JSON line per image after every batch; fsyncs every `sync_every` batches."""

    def __init__(self, path: Path, settings: dict, records: dict[str, dict], keep_bytes: int | None,
                 sync_every: int = 1):
        self.path = path
        self.records = records
        self.sync_every = sync_every
        self.batches = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_bytes is None:  # new journal
            self.fh = open(path, "wb")
            self.fh.write(json_line({"journal": "jj-vmed", "version": JOURNAL_VERSION, "settings": settings,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            self.sync()
        else:
            self.fh = open(path, "r+b")
            self.fh.truncate(keep_bytes)  # drop a torn last line so new lines start clean
            self.fh.seek(keep_bytes)

    def append(self, entries: list[dict]) -> None:
        if not entries:
            return
        self.fh.write(b"".join(json_line(e) for e in entries))
        self.fh.flush()
        for e in entries:
            self.records[e["id"]] = e
        self.batches += 1
        if self.batches % self.sync_every == 0:
            os.fsync(self.fh.fileno())

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        if not self.fh.closed:
            self.sync()
            self.fh.close()


def json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def open_journal(path: Path, settings: dict, resume: str | None, force_resume: bool, overwrite: bool,
                 sync_every: int, explicit: bool) -> Journal:
    """Start or continue a journal, refusing anything that could mix two different runs."""
    if path.exists() and not overwrite:
        header, records, keep = read_journal(path)
        if resume is None:
            raise UserError(
                f"a checkpoint journal from an earlier run exists at {path} ({len(records)} images done); "
                "add --resume_from_checkpoint auto to continue it, or --overwrite to start over"
            )
        diffs = settings_differences(header.get("settings", {}), settings)
        if diffs and not force_resume:
            raise UserError(
                f"cannot resume from {path}: it was written with other settings ({'; '.join(diffs)}); "
                "use the same settings, --force_resume to continue anyway, or --overwrite to start over"
            )
        log(f"resuming from {path}: {sum(1 for r in records.values() if r.get('error') is None)} images already done")
        return Journal(path, settings, records, keep, sync_every)
    if resume is not None and explicit and not overwrite:
        raise UserError(f"--resume_from_checkpoint {path}: no such journal")
    if resume == "auto":
        log(f"no checkpoint journal at {path}; starting fresh")
    return Journal(path, settings, {}, None, sync_every)
