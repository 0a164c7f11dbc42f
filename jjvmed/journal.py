"""The append-only journal of raw generations: the single source of truth for the CSVs.

One JSON line per image, appended after every batch. The first line records what the journal is
of: the settings that decide the text and the image folder; each record also keeps its file's
size and modification time. A resume with other settings or another folder is refused, and an
image whose file changed since is generated again: stale text is never reused.

A journal survives anything a run can meet: a torn last line (a kill mid-write) is dropped and
redone; a damaged line elsewhere is set aside in a side file and its image redone; an exclusive
lock (released by the OS when the process dies, so a SIGKILL leaves none behind) keeps a second
run off the same journal.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, log
from .files import write_bytes_atomic
from .records import Record

JOURNAL_VERSION = 2


def default_journal_path(output_csv: str | Path, checkpoint_dir: str | None, suffix: str = "") -> Path:
    out = Path(output_csv)
    folder = Path(checkpoint_dir) if checkpoint_dir else out.parent
    return folder / f"{out.stem}{suffix}.journal.jsonl"


def file_identity(path: str) -> list[int]:
    """A cheap identity of an image file: size and modification time (ns). [] if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class JournalContents:
    header: dict
    records: dict[str, Record]  # last record per ID
    identities: dict[str, list[int]]  # ID -> file identity when its record was written
    bad_lines: list[tuple[int, bytes]]  # (line number, raw line) that could not be read as a record
    torn_tail: bool  # the last line was cut off by a kill


def parse_record(raw: bytes) -> tuple[Record, list[int]] | None:
    """A record line, or None if it is not one (damaged JSON, wrong types, missing fields)."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        return None
    text, error, ident = entry.get("text"), entry.get("error"), entry.get("file", [])
    if not isinstance(text, str) or not (error is None or isinstance(error, str)) or not isinstance(ident, list):
        return None
    return Record(entry["id"], text, error), ident


def read_journal(path: Path) -> JournalContents:
    """Everything a journal holds; damaged lines are returned apart, never raised on."""
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    torn = bool(lines) and lines[-1].strip() != b""  # no final newline: the last write was cut off
    body = lines[:-1]
    header = None
    records: dict[str, Record] = {}
    identities: dict[str, list[int]] = {}
    bad: list[tuple[int, bytes]] = []
    for number, raw in enumerate(body, start=1):
        if not raw.strip():
            continue
        if header is None:
            try:
                header = json.loads(raw)
            except ValueError:
                header = None
            if not isinstance(header, dict) or header.get("journal") != "jj-vmed":
                raise UserError(f"{path} is not a JJ-VMed checkpoint journal (line {number}); move it away")
            continue
        parsed = parse_record(raw)
        if parsed is None:
            bad.append((number, raw))
            continue
        record, ident = parsed
        records[record.id] = record
        identities[record.id] = ident
    if header is None:
        raise UserError(f"checkpoint journal {path} has no header line; delete it to start over")
    return JournalContents(header, records, identities, bad, torn)


def settings_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def record_line(record: Record, identity: list[int]) -> bytes:
    entry = {"id": record.id, "text": record.text, "error": record.error, "file": identity}
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")


def header_line(settings: dict, image_dir: str) -> bytes:
    header = {"journal": "jj-vmed", "version": JOURNAL_VERSION, "settings": settings, "image_dir": image_dir,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return (json.dumps(header, ensure_ascii=False) + "\n").encode("utf-8")


class Journal:
    """Appends one JSON line per image after every batch; fsyncs every `sync_every` batches.

    A new journal's file is created with the first records, so a run that fails before
    generating anything (model not found, no GPU) leaves nothing that blocks the plain rerun.
    """

    def __init__(self, path: Path, header: bytes, records: dict[str, Record], sync_every: int, exists: bool):
        self.path = path
        self.header = header
        self.records = dict(records)
        self.sync_every = sync_every
        self.batches = 0
        self.fh = open(path, "ab") if exists else None

    def append(self, records: list[Record], identities: dict[str, list[int]]) -> None:
        if not records:
            return
        if self.fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "wb")
            self.fh.write(self.header)
        self.fh.write(b"".join(record_line(r, identities.get(r.id, [])) for r in records))
        self.fh.flush()
        self.records.update((r.id, r) for r in records)
        self.batches += 1
        if self.batches % self.sync_every == 0:
            os.fsync(self.fh.fileno())

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def heal(path: Path, contents: JournalContents) -> None:
    """Set damaged lines aside in a side file and rewrite the journal with its good lines only."""
    side = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}.txt")
    write_bytes_atomic(side, b"".join(b"line %d: %s\n" % (n, raw) for n, raw in contents.bad_lines))
    body = b"".join(record_line(r, contents.identities.get(i, [])) for i, r in contents.records.items())
    header = (json.dumps(contents.header, ensure_ascii=False) + "\n").encode("utf-8")
    write_bytes_atomic(path, header + body)
    log(f"warning: {len(contents.bad_lines)} damaged line(s) in {path} set aside in {side}; "
        "their images are generated again")


def open_journal(path: Path, settings: dict, image_dir: str, identities: dict[str, list[int]], resume: str | None,
                 force_resume: bool, overwrite: bool, sync_every: int) -> Journal:
    """Start or continue a journal, refusing anything that could mix two different runs.

    The records it starts with are only those still valid: same settings, same folder, and an
    image file unchanged since its record was written.
    """
    header = header_line(settings, image_dir)
    explicit = resume not in (None, "auto")
    if not path.exists() or overwrite:
        if explicit and not overwrite:
            raise UserError(f"--resume_from_checkpoint {path}: no such journal")
        if resume == "auto":
            log(f"no checkpoint journal at {path}; starting fresh")
        if overwrite:
            path.unlink(missing_ok=True)
        return Journal(path, header, {}, sync_every, exists=False)
    contents = read_journal(path)
    if resume is None:
        raise UserError(
            f"a checkpoint journal from an earlier run exists at {path} ({len(contents.records)} images done); "
            "add --resume_from_checkpoint auto to continue it, or --overwrite to start over"
        )
    diffs = settings_differences(contents.header.get("settings", {}), settings)
    old_dir = contents.header.get("image_dir")
    if old_dir is not None and old_dir != image_dir:
        diffs.append(f"image folder: {old_dir} -> {image_dir}")
    if diffs and not force_resume:
        raise UserError(
            f"cannot resume from {path}: it was written with other settings ({'; '.join(diffs)}); "
            "use the same settings, --force_resume to continue anyway, or --overwrite to start over"
        )
    if contents.bad_lines:
        heal(path, contents)
    elif contents.torn_tail:
        truncate_torn_tail(path)
    valid = {i: r for i, r in contents.records.items()
             if i in identities and contents.identities.get(i) == identities[i]}
    changed = sum(1 for i in contents.records if i in identities and i not in valid)
    if changed:
        log(f"warning: {changed} image(s) changed since the journal recorded them; they are generated again")
    log(f"resuming from {path}: {sum(1 for r in valid.values() if r.ok)} images already done")
    return Journal(path, header, valid, sync_every, exists=True)


def truncate_torn_tail(path: Path) -> None:
    """Drop a last line cut off by a kill, so the next append starts on a fresh line."""
    with open(path, "r+b") as fh:
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)
