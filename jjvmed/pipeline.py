"""The one run pipeline: `run(cfg, source, writer)`, for every method of every script.

    check the outputs -> select the images (or rows) in the ID list's order -> lock the outputs
    -> the source makes a record per image (generate into the journal, embed into the store, read a
       file, look up neighbours) -> the writer turns the records into the output files
    -> the 2026 pre-check -> the upload zip -> the errors file and the summary -> the exit code.

A source (sources.py) has `outputs()` (files it writes: journal, embeddings), `check()` (conflicts
refused before anything loads), `ids()` (the IDs it reads from a file, or None: the image folder's)
and `produce(cfg, selection) -> RunResult`. A writer (writers.py) has `outputs()` (the submission
first), `submission` (the file the platform gets, or None) and `write(ids, result) -> [paths]`.
A new method is a new source or writer; nothing here changes.
"""

from __future__ import annotations

import errno
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import UserError, first_line, log
from .files import check_writable, lock_exclusive, write_errors
from .images import list_images, scan_folder
from .journal import default_journal_path
from .records import Record
from .shards import Shard

SUBMISSION_TASK = {"caption": "captions", "concepts": "concepts"}  # submission.py's names for the tasks
RESUME = "rerun the same command with --resume_from_checkpoint auto"


@dataclass(frozen=True)
class RunConfig:
    """What every run has, whatever its method: where the answers go, which images, how it resumes."""

    task: str  # caption | concepts
    output_csv: str  # the submission file (also names the journal and the other outputs beside it)
    image_dir: str | None = None  # None: the source reads its IDs from a file
    ids_csv: str | None = None
    limit: int | None = None
    zip_path: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 1
    resume: str | None = None  # None | "auto" | a journal path
    force_resume: bool = False
    overwrite: bool = False
    shard: Shard | None = None
    merge: bool = False  # --merge_shards: build the CSVs from the shards' journals

    @property
    def journal_path(self) -> Path:
        if self.resume not in (None, "auto"):
            return Path(self.resume)
        return default_journal_path(self.output_csv, self.checkpoint_dir, self.shard.suffix if self.shard else "")

    @property
    def writes_csv(self) -> bool:
        """One process writes the CSVs: a plain run, the merge, or rank 0 under a launcher."""
        return self.shard is None or self.shard.writes_csv


@dataclass(frozen=True)
class Selection:
    """The images (or rows) of the run, in output order, and what was left out of it."""

    items: list[tuple[str, str | None]]  # (ID, image path or None)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # why -> names

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.items]


@dataclass(frozen=True)
class RunResult:
    ids: list[str]  # every ID of the run (of this process's share, for a shard), in output order
    records: dict[str, Record]
    # where the raw answers (and vectors) are kept, for the summary: (("journal", path), ("embeddings", path))
    kept: tuple[tuple[str, str | Path], ...] = ()
    seconds: float = 0.0
    done_now: int = 0  # images the rate counts: generated (or embedded, for the embedding methods) in this invocation
    stopped: int | None = None  # the signal that stopped the run early, if one did
    detail: str = ""  # how the work ran, for the summary (e.g. "batch size 16 (auto), compiled")
    working_seconds: float = 0.0  # of `seconds`, those spent making the `done_now` images (the rate's)
    # of `seconds`, other timed steps, each named: (("embedding 55 images", 2.1), ("reranking", 0.4)); what
    # neither they nor the work took is loading (models, files)
    phases: tuple[tuple[str, float], ...] = ()
    embeddings: object | None = None  # embeddings.Embeddings of the run's images, for vision methods
    verb: str = "generated"  # what the source did to an image ("generated", "embedded", "read"), for the summary
    doing: str = ""  # what the rate measures ("generating", "embedding"); default: from `verb`

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [(i, self.records[i].error) for i in self.ids if i in self.records and not self.records[i].ok]

    @property
    def missing(self) -> int:
        return sum(1 for i in self.ids if i not in self.records)


class Source(Protocol):
    def outputs(self) -> list[str]: ...
    def check(self) -> None: ...
    def ids(self) -> list[str] | None: ...
    def produce(self, cfg: RunConfig, selection: Selection) -> RunResult: ...


class Writer(Protocol):
    submission: str | None

    def outputs(self) -> list[str]: ...
    def write(self, ids: list[str], result: RunResult) -> list[Path]: ...


def run(cfg: RunConfig, source: Source, writer: Writer) -> int:
    """Everything between the inputs and the checked submission; returns the exit code."""
    check_outputs(cfg, source, writer)
    source.check()
    selection = select(cfg, source)
    try:
        with ExitStack() as stack:
            if cfg.writes_csv:
                for path in writer.outputs():
                    stack.enter_context(lock_exclusive(Path(path)))
            result = source.produce(cfg, selection)
            if not cfg.writes_csv or result.stopped is not None:
                return finish(cfg, selection, result, [], accepted=True)
            written = writer.write(selection.ids, result)
            accepted = True
            if writer.submission:
                accepted = check_submission(cfg, writer.submission, selection.ids)
                if accepted and cfg.zip_path:
                    from .submission import write_zip

                    written.append(write_zip(writer.submission, cfg.zip_path))
            return finish(cfg, selection, result, written, accepted)
    except OSError as e:
        raise os_failure(e) from None
    except RuntimeError as e:
        # torch's SIGCHLD handler raises this wherever the main thread is when a worker dies
        if "DataLoader worker" not in str(e):
            raise
        raise worker_died(e) from None


def worker_died(error: BaseException) -> UserError:
    return UserError(f"an image-decoding worker died ({first_line(error)}; killed for lack of memory?): {RESUME} "
                     "and fewer --num_workers; finished batches are kept")


def check_outputs(cfg: RunConfig, source: Source, writer: Writer) -> None:
    """Before anything loads: every output writable, no two outputs the same file, a zip named .zip."""
    named = [(p, "output") for p in writer.outputs()] if cfg.writes_csv else []
    named += [(p, "output") for p in source.outputs()]
    if cfg.zip_path and cfg.writes_csv:
        from .submission import check_zip_path

        if cfg.limit and writer.submission:
            raise UserError(f"--zip with --limit {cfg.limit}: a trial on the first {cfg.limit} images is never an "
                            "upload (the platform wants every ID of the list); drop one of them")
        check_zip_path(cfg.zip_path)
        named.append((cfg.zip_path, "upload zip"))
    seen: dict[str, str] = {}
    for path, what in named:
        check_writable(path, what)
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"{path} is given as two outputs of this run ({seen[real]} and {path}): one would "
                            "overwrite the other; give each its own file")
        seen[real] = path


def select(cfg: RunConfig, source: Source) -> Selection:
    """The run's images in output order: the folder's in natural ID order (or the source's IDs), or exactly
    the order of --ids_csv; then --limit."""
    from .submission import in_id_list_order

    ids = source.ids()
    if ids is None:
        scan = scan_folder(cfg.image_dir)
        skipped, items = dict(scan.skipped), scan.items
        where = f"image in {cfg.image_dir}"
    else:
        skipped, items = {}, [(i, None) for i in ids]
        where = "row"
    if cfg.ids_csv:
        items, extra = in_id_list_order(items, cfg.ids_csv, where)
        if extra:
            skipped[f"{'images' if ids is None else 'rows'} not in --ids_csv"] = extra
    if not items and ids is None:
        list_images(cfg.image_dir)  # raises the "no images" error with its hints
    return Selection(items[: cfg.limit] if cfg.limit else items, skipped)


def own_rows_note(rows: int) -> str:
    """What a zip written without an ID list was checked against (its set and order of IDs were not)."""
    return (f"note: the zip was checked against its own {rows} rows; give --ids_csv to check against the test "
            "set's ID list")


def os_failure(error: OSError) -> UserError:
    """Disk full and friends: one line with what to do; the journal keeps every finished batch."""
    resume = f"then {RESUME}; finished batches are kept"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"disk full while writing {error.filename or 'the results'}: free some space, {resume}")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {error.filename}: {error.strerror}; fix the permissions, {resume}")
    return UserError(f"{error.strerror or first_line(error)} ({error.filename or 'no file name'}); {resume}")


def check_submission(cfg: RunConfig, path: str | Path, ids: list[str]) -> bool:
    """Run the platform's 2026 pre-check on a file this run wrote (IDs and their order too); log what it says."""
    from .submission import log_report, validate_file

    report = validate_file(SUBMISSION_TASK[cfg.task], path, ids)
    log_report(report, str(path), limit=10)
    if cfg.limit:
        log(f"note: --limit {cfg.limit}: the check covered the first {len(ids)} IDs only, not a whole submission")
    return report.accepted


def finish(cfg: RunConfig, selection: Selection, result: RunResult, outputs: list[Path], accepted: bool) -> int:
    """Errors file, summary, exit code: 128 + signal after a stop, 1 if the checks rejected the file."""
    failures = result.failures
    errors_file = write_errors(cfg.output_csv, failures) if cfg.writes_csv and result.stopped is None else None
    before = len(result.ids) - result.missing - result.done_now
    if result.verb == "generated":
        counts = (f" (generated now: {result.done_now}, done before: {max(before, 0)}"
                  + (f", not done yet: {result.missing}" if result.missing else "") + ")")
    elif result.verb == "embedded":  # the vectors of unchanged images are kept from an earlier run
        # images that could not be read are neither: they have the failures line
        counts = f" (embedded now: {result.done_now}, reused: {max(before - len(failures), 0)})"
    else:
        counts = f" ({result.verb}: {len(result.ids) - result.missing - len(failures)})"
    lines = [f"images: {len(result.ids)}{counts}",
             f"failures: {len(failures)}" + (f" (listed in {errors_file})" if errors_file else "")]
    if result.seconds:
        lines.append(time_line(result))
    lines += [f"{what}: {where}" for what, where in result.kept]
    for why, names in selection.skipped.items():
        lines.append(f"skipped, {why}: {len(names)} ({', '.join(repr(n) for n in names[:3])}"
                     f"{', ...' if len(names) > 3 else ''})")
    if result.stopped is not None:
        lines.append(f"stopped early: {RESUME} to continue")
    elif not cfg.writes_csv:
        lines.append("this process's share is done; rank 0 writes the CSVs" if cfg.shard and cfg.shard.distributed
                     else "this shard is done; when every shard is, build the CSVs with the same command, "
                     "--merge_shards instead of --num_shards/--shard_index")
    else:
        lines += [f"wrote: {p}" for p in outputs]
        if cfg.zip_path and not cfg.ids_csv and Path(cfg.zip_path) in map(Path, outputs):
            lines.append(own_rows_note(len(selection.ids)))
    log("\n".join(lines))
    if result.stopped is not None:
        return 128 + result.stopped
    return 0 if accepted else 1


def time_line(result: RunResult) -> str:
    """Where the time went: loading, each timed step, and the rate of the work alone, as the progress bar gives
    it (loading an 8B model takes minutes). No rate when nothing was made: a rerank-only or all-reused run."""
    timed = result.working_seconds + sum(seconds for _, seconds in result.phases)
    parts = [f"{max(result.seconds - timed, 0.0):.1f} s loading"]
    parts += [f"{seconds:.1f} s {name}" for name, seconds in result.phases]
    line = f"time: {result.seconds:.1f} s ({', '.join(parts)})"
    if result.done_now and result.working_seconds > 0:
        doing = result.doing or {"generated": "generating", "embedded": "embedding"}.get(result.verb, "working")
        line += f", {result.done_now / result.working_seconds:.2f} images/s while {doing}"
    return line + (f", {result.detail}" if result.detail else "")
