"""Every file the tool writes goes through here: whole or not at all, readable by colleagues; and what
identifies a file the tool read, so a resume can tell whether it changed."""

from __future__ import annotations

import csv
import fcntl
import io
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UNDO_AT_EXIT, UserError


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
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
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


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, not after a night of generation, if `path` cannot be written.

    Creates (and removes) a file in the nearest existing folder: permission bits alone do not tell
    (read-only mounts, /proc, quotas on some file systems).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"the {what} {path} is a folder; give a file name, e.g. {path / 'results.csv'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write the {what} {path}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {folder} is not writable ({e.strerror})") from None


@contextmanager
def lock_exclusive(path: str | Path, remedy: str = "give this run another --output_csv") -> Iterator[None]:
    """Hold an exclusive lock tied to `path` for the block, or refuse at once naming the holder and `remedy`.

    An advisory lock on a side file (`.NAME.lock`): the OS drops it when the process dies, so a
    killed run never leaves a stale lock behind. A POSIX record lock (lockf), not flock: forked
    DataLoader workers do not inherit it, so a worker outliving its killed parent holds nothing.
    The side file, and the folders made for it, are removed when the block ends or the process exits at
    once on a signal (errors.exit_at_once), so a run that stopped (or failed to start) leaves nothing beside
    its outputs; only a killed process leaves the side file, unlocked.
    """
    path = Path(path)
    made = missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            remove_empty(made)
            raise UserError(f"another run (PID {holder}) is using {path}; wait for it to end, or {remedy}") from None
        # The holder before us removes the file as it lets go: if that happened between our open and our
        # lock, we hold a file nobody else can find. Take the lock again on the file the path names now.
        if same_file(fd, lock_path):
            break
        os.close(fd)

    owner = os.getpid()

    def release() -> None:
        # a forked child (an image-decoding worker) inherits UNDO_AT_EXIT but not the lock: it removes nothing
        if os.getpid() != owner:
            return
        lock_path.unlink(missing_ok=True)  # while still holding it: whoever opens it next gets a new file
        remove_empty(made)

    token = object()
    UNDO_AT_EXIT[token] = release
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        UNDO_AT_EXIT.pop(token, None)
        release()
        os.close(fd)


def missing_folders(folder: Path) -> list[Path]:
    """The folders `folder.mkdir(parents=True)` would make, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders a lock made (deepest first) that nothing else was written into."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: the run wrote its outputs there, keep it and the folders above


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def errors_path(output: str | Path) -> Path:
    """`<stem>.errors.csv` beside an output (a CSV, an embeddings file): the images that failed."""
    out = Path(output)
    return out.with_name(f"{out.stem}.errors.csv")


def write_errors(output: str | Path, failures: list[tuple[str, str]]) -> Path | None:
    """List failed images beside the output; remove a stale list when nothing failed."""
    path = errors_path(output)
    if not failures:
        path.unlink(missing_ok=True)
        return None
    return write_csv_atomic(path, ["ID", "Error"], ([i, e] for i, e in failures))


def resolved_folder(name: str) -> str:
    """A model named by a local folder: where it resolves (`./clip`, `/data/clip` and a link to it are one
    folder); any other name (a hub ID, a folder absent here) as written."""
    return os.path.realpath(name) if os.path.isdir(name) else name


def is_utf8(text: str) -> bool:
    """False for text holding bytes that are not UTF-8: a file name from an old archive, which Python holds as
    lone surrogates, or a journal line made of one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_identity(path: str | Path) -> list[int]:
    """What a resume compares without reading the file: size, modification time and status-change time (ns).

    The status-change time (ctime) is set by the system on every write, rename, chmod or time change
    and cannot be set back: a file replaced by one of the same size with its modification time
    restored still shows a new ctime. [] if the file cannot be read.
    """
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_digest(path: str | Path) -> str:
    """CRC-32 of the file's bytes (8 hex digits).

    It only has to tell a file replaced by accident from a copy of the same bytes (1 in 4 billion
    replacements would pass), not resist a file made to match; it costs half what SHA-256 does (0.2
    ms for a 306 KB PNG, 1.7% of decoding it: benchmarks/listing_resume.py).
    """
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"
