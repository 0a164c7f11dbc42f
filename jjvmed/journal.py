"""The append-only journal of raw generations: the single source of truth for the CSVs.

One JSON line per image, appended after every batch. The first line records what the journal is
of: the settings that decide the text and the image folder; each record also keeps what identified
its file (size, modification and status-change times) and the CRC-32 of the bytes the model saw.
A best-of-N record also keeps every candidate and, per reranker, their scores (optional fields: a
journal without them reads as before, and an older reader takes such a record's text).
A resume with other settings or another folder is refused, and an image whose file changed since
is generated again: stale text is never reused.

A journal survives anything a run can meet: a torn last line (a kill mid-write) is dropped and
redone; a damaged line elsewhere is set aside in a side file and its image redone; a journal cut
off before its first line ended (a kill or a full disk at the first write) holds nothing and is
started over; an exclusive lock (released by the OS when the process dies, so a SIGKILL leaves none
behind) keeps a second run off the same journal.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, log
from .files import file_digest, file_identity, is_utf8, resolved_folder, write_bytes_atomic
from .records import Record

JOURNAL_VERSION = 3  # 3: records keep the status-change time and the content digest; 2 kept size and mtime only
HEADER_START = b'{"journal": "jj-vmed"'  # how every header line begins (json.dumps keeps the key order)


def default_journal_path(output_csv: str | Path, checkpoint_dir: str | None, suffix: str = "") -> Path:
    out = Path(output_csv)
    folder = Path(checkpoint_dir) if checkpoint_dir else out.parent
    return folder / f"{out.stem}{suffix}.journal.jsonl"


@dataclass(frozen=True)
class JournalContents:
    header: dict
    records: dict[str, Record]  # last record per ID
    identities: dict[str, list]  # ID -> file identity when its record was written (files.file_identity)
    digests: dict[str, str]  # ID -> digest of the file its text was generated from (journals of version 3)
    bad_lines: list[tuple[int, bytes]]  # (line number, raw line) that could not be read as a record
    torn_tail: bool  # the last line was cut off by a kill


DECODER = json.JSONDecoder()


def parse_json(line: str):
    """The JSON value of a line, or None if it is not one (garbage, or nesting too deep to read).

    The decoder directly, on lines decoded from the file at once: cheaper than json.loads per line
    of bytes, which keeps the longer records of version 3 from slowing a resume
    (benchmarks/listing_resume.py).
    """
    line = line.lstrip()
    try:
        value, end = DECODER.raw_decode(line)
    except (ValueError, RecursionError):
        return None
    return value if end == len(line) or line[end:].isspace() else None


def parse_record(line: str) -> tuple[Record, list, str | None] | None:
    """A record line, or None if it is not one (damaged JSON, wrong types, missing fields)."""
    entry = parse_json(line)
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
        return None
    image_id, text, error, ident, digest = (entry["id"], entry.get("text"), entry.get("error"), entry.get("file", []),
                                            entry.get("crc32"))
    if not isinstance(text, str) or not (error is None or isinstance(error, str)) or not isinstance(ident, list) \
            or not (digest is None or isinstance(digest, str)):
        return None
    best_of = parse_candidates(entry.get("candidates", []), entry.get("scores", {}))
    if best_of is None:
        return None
    candidates, scores = best_of
    if not (image_id.isascii() and text.isascii() and (error is None or error.isascii())
            and all(c.isascii() for c in candidates)) \
            and not all(is_utf8(s) for s in (image_id, text, error or "", *candidates)):
        return None  # bytes that are not UTF-8, or a lone surrogate (\ud800): no CSV can hold them
    return Record(image_id, text, error, candidates, scores), ident, digest


def parse_candidates(candidates, scores) -> tuple[tuple[str, ...], dict[str, tuple[float | None, ...]]] | None:
    """The best-of-N fields of a record (absent in journals without candidates), or None if they are damaged:
    candidates are strings, and each reranker's scores are one number (or null) per candidate."""
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates) \
            or not isinstance(scores, dict):
        return None
    for values in scores.values():
        if not isinstance(values, list) or len(values) != len(candidates) \
                or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            return None
    return tuple(candidates), {k: tuple(v) for k, v in scores.items()}


def holds_nothing(data: bytes) -> bool:
    """A journal cut off before its first line ended: empty, or the start of a header and no more."""
    return b"\n" not in data and (data.startswith(HEADER_START) or HEADER_START.startswith(data))


def read_journal(path: Path) -> JournalContents | None:
    """Everything a journal holds; damaged lines are returned apart, never raised on.

    None for a journal cut off before its first line ended (it holds nothing to resume).
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if holds_nothing(data):
        return None
    # Bytes that are not UTF-8 stay as lone surrogates: the line is set aside, and written back unchanged.
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    torn = lines[-1].strip() != ""  # no final newline: the last write was cut off
    header = None
    records: dict[str, Record] = {}
    identities: dict[str, list] = {}
    digests: dict[str, str] = {}
    bad: list[tuple[int, bytes]] = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line or line.isspace():
            continue
        if header is None:
            header = parse_json(line)
            if not isinstance(header, dict) or header.get("journal") != "jj-vmed":
                raise UserError(f"{path} is not a JJ-VMed checkpoint journal (line {number}); move it away")
            continue
        parsed = parse_record(line)
        if parsed is None:
            bad.append((number, line.encode("utf-8", "surrogateescape")))
            continue
        record, ident, digest = parsed
        records[record.id] = record
        identities[record.id] = ident
        if digest is None:
            digests.pop(record.id, None)
        else:
            digests[record.id] = digest
    if header is None:
        raise UserError(f"{path} is not a JJ-VMed checkpoint journal (no header line); move it away")
    return JournalContents(header, records, identities, digests, bad, torn)


MODEL_FOLDERS = ("base_model_path", "adapter")  # settings that name a model: a hub ID or a local folder


def settings_differences(old: dict, new: dict) -> list[str]:
    """`old`'s settings that `new` changes. A model is the same if it is named the same, or, where both names
    are local folders here, if they resolve to one folder (spelled relative, absolute or through a link). Names
    are recorded as given: a merge on a machine without the model, or shards on nodes with their own copy at
    the same path, compare them as written."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k) and not (k in MODEL_FOLDERS and same_local_folder(old.get(k), new.get(k)))]


def same_local_folder(a: object, b: object) -> bool:
    return isinstance(a, str) and isinstance(b, str) and resolved_folder(a) == resolved_folder(b)


JSON_TYPES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
              type(None): "null"}


def header_differences(header: dict, settings: dict, image_dir: str) -> list[str]:
    """How the journal's header differs from this command (its value -> this command's).

    Settings that cannot be read (a damaged header) count as different: they cannot be shown equal.
    """
    old = header.get("settings", {})
    if isinstance(old, dict):
        diffs = settings_differences(old, settings)
    else:
        found = JSON_TYPES.get(type(old), type(old).__name__)
        diffs = [f"settings: unreadable in the journal ({found} instead of an object)"]
    old_dir = header.get("image_dir")
    if old_dir is not None and old_dir != image_dir:
        diffs.append(f"image folder: {old_dir} -> {image_dir}")
    return diffs


def changed_images(contents: JournalContents, files: dict[str, str], identities: dict[str, list]) -> set[str]:
    """IDs among `files` (ID -> path; `identities`: their identity now) whose record was made from another file.

    Size and modification time must match. The status-change time too, or else the content: a copy
    with its times kept (cp -a, rsync -a) or a chmod gives a new ctime and the same bytes, and such a
    file is read once more to compare its digest. Journals of version 2 recorded size and
    modification time only, and are compared on those.
    """
    changed: set[str] = set()
    by_content: list[str] = []
    for i, recorded in contents.identities.items():
        if i not in files or recorded == identities[i]:
            continue
        if recorded[:2] != identities[i][:2]:
            changed.add(i)
        elif len(recorded) > 2:
            by_content.append(i)
            if not same_content(files[i], contents.digests.get(i)):
                changed.add(i)
    if by_content:
        log(f"{len(by_content)} image(s) kept their size and modification time but have a new status-change time "
            f"(copied, restored or chmod-ed): compared by content, {len(changed.intersection(by_content))} changed")
    return changed


def same_content(path: str, digest: str | None) -> bool:
    if digest is None:  # no digest recorded (the image had failed): nothing to show it is the same
        return False
    try:
        return file_digest(path) == digest
    except OSError:
        return False


def record_line(record: Record, identity: list, digest: str | None = None) -> bytes:
    entry = {"id": record.id, "text": record.text, "error": record.error, "file": identity}
    if digest is not None:
        entry["crc32"] = digest
    if record.candidates:  # best of N; journals without candidates keep their old lines
        entry["candidates"] = list(record.candidates)
    if record.scores:
        entry["scores"] = {k: list(v) for k, v in record.scores.items()}
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")


def header_line(settings: dict, image_dir: str) -> bytes:
    header = {"journal": "jj-vmed", "version": JOURNAL_VERSION, "settings": settings, "image_dir": image_dir,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return encode_header(header)


def encode_header(header: dict) -> bytes:
    """A folder or model path whose bytes are not UTF-8 is written back as those bytes, as it is read."""
    return (json.dumps(header, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")


class Journal:
    """Appends one JSON line per image after every batch; fsyncs every `sync_every` batches.

    A new journal's file is created with the first records, so a run that fails before
    generating anything (model not found, no GPU) leaves nothing that blocks the plain rerun; if
    that first write fails (a full disk), the file is removed again for the same reason.
    """

    def __init__(self, path: Path, header: bytes, records: dict[str, Record], identities: dict[str, list],
                 sync_every: int, exists: bool):
        self.path = path
        self.header = header
        self.records = dict(records)
        self.identities = identities  # ID -> identity of its file when the run started
        self.sync_every = sync_every
        self.batches = 0
        self.fh = open(path, "ab") if exists else None
        self.failed = False

    def append(self, records: list[Record], digests: dict[str, str]) -> None:
        """Write the batch's records; `digests`: ID -> digest of the file decoded (images.Loader.digests)."""
        if not records:
            return
        lines = b"".join(record_line(r, self.identities.get(r.id, []), digests.get(r.id)) for r in records)
        try:
            if self.fh is None:
                self.start(lines)
            else:
                self.fh.write(lines)
                self.fh.flush()
        except OSError as e:
            self.failed = True
            if e.filename is None:  # a failed write names no file: say which one
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            raise
        self.records.update((r.id, r) for r in records)
        self.batches += 1
        if self.batches % self.sync_every == 0:
            os.fsync(self.fh.fileno())

    def start(self, lines: bytes) -> None:
        """Create the file with its header and first records, or leave no file at all."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "wb")
        try:
            fh.write(self.header + lines)
            fh.flush()
        except BaseException:
            try:
                fh.close()
            except OSError:
                pass  # the bytes it still holds cannot be written either
            self.path.unlink(missing_ok=True)
            raise
        self.fh = fh

    def close(self) -> None:
        if self.fh is None or self.fh.closed:
            return
        if self.failed:  # a write already failed (a full disk): what is on disk is a prefix, read as such
            try:
                self.fh.close()
            except OSError:
                pass
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def heal(path: Path, contents: JournalContents) -> None:
    """Set damaged lines aside in a side file and rewrite the journal with its good lines only."""
    side = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}.txt")
    write_bytes_atomic(side, b"".join(b"line %d: %s\n" % (n, raw) for n, raw in contents.bad_lines))
    body = b"".join(record_line(r, contents.identities.get(i, []), contents.digests.get(i))
                    for i, r in contents.records.items())
    write_bytes_atomic(path, encode_header(contents.header) + body)
    log(f"warning: {len(contents.bad_lines)} damaged line(s) in {path} set aside in {side}; "
        "their images are generated again")


def open_journal(path: Path, settings: dict, image_dir: str, files: dict[str, str], resume: str | None,
                 force_resume: bool, overwrite: bool, sync_every: int) -> Journal:
    """Start or continue a journal, refusing anything that could mix two different runs.

    `files`: ID -> path of every image of this run. The records it starts with are only those still
    valid: same settings, same folder, and an image file unchanged since its record was written.
    """
    header = header_line(settings, image_dir)
    identities = {i: file_identity(p) for i, p in files.items()}
    explicit = resume not in (None, "auto")
    if overwrite:
        path.unlink(missing_ok=True)
    elif explicit and not path.exists():
        raise UserError(f"--resume_from_checkpoint {path}: no such journal")
    contents = read_journal(path) if path.exists() else None
    if contents is None:
        if path.exists():
            log(f"checkpoint journal {path} was cut off before its first record (a kill or a full disk at the "
                "first write); starting it over")
        elif resume == "auto":
            log(f"no checkpoint journal at {path}; starting fresh")
        return Journal(path, header, {}, identities, sync_every, exists=False)
    if resume is None:
        raise UserError(
            f"a checkpoint journal from an earlier run exists at {path} ({len(contents.records)} images done); "
            "add --resume_from_checkpoint auto to continue it, or --overwrite to start over"
        )
    diffs = header_differences(contents.header, settings, image_dir)
    if diffs and not force_resume:
        raise UserError(
            f"cannot resume from {path}: it was written with other settings ({'; '.join(diffs)}); "
            "use the same settings, --force_resume to continue anyway, or --overwrite to start over"
        )
    if contents.bad_lines:
        heal(path, contents)
    elif contents.torn_tail:
        truncate_torn_tail(path)
    changed = changed_images(contents, files, identities)
    valid = {i: r for i, r in contents.records.items() if i in files and i not in changed}
    if changed:
        log(f"warning: {len(changed)} image(s) changed since the journal recorded them; they are generated again")
    log(f"resuming from {path}: {sum(1 for r in valid.values() if r.ok)} images already done")
    return Journal(path, header, valid, identities, sync_every, exists=True)


def truncate_torn_tail(path: Path) -> None:
    """Drop a last line cut off by a kill, so the next append starts on a fresh line."""
    with open(path, "r+b") as fh:
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)
