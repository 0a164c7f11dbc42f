"""Listing and resume at 20,000 images: this checkout against an earlier revision, and what a decoding
worker pays for the file digest the journal keeps.

    python benchmarks/listing_resume.py                     # against the branch point with main
    python benchmarks/listing_resume.py --before v1.2 --repeats 9

Phases, each timed in a fresh interpreter of its own revision (same code path as a run, no model):
- listing: `images.scan_folder` over the folder (20,000 image files, distinct files);
- resume: what a resumed run does before its first batch: read the 20,000-record journal, compare
  every file with its record (the file identities), and select the images left to do (none here).
  Each revision resumes a journal written by its own code, for the same folder.
- resume, every ctime new (this checkout only): the same after a chmod of every file, as a copy with
  its times kept (cp -a, rsync -a) leaves it: the files are read once to compare their CRC-32. The
  folder holds hard links to the shipped real PNGs (306 KB on average), so reads come from a warm
  page cache: the CPU cost; a cold disk adds its read time.
- decoding worker, per image: load_image alone (what the earlier dataset did per image) against the
  CRC-32 plus load_image (what the run's loader does now; embedding runs leave the digest off), and
  SHA-256 plus load_image (the digest not chosen),
  over the shipped real PNGs; and each digest alone, the steadier measure of what it adds.

Contenders run interleaved (A B, B A, ...) and repeated; tables give min / median / max. Every
interpreter gets one thread (OMP/MKL), as the phases are single-threaded Python.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = ROOT / "tests" / "data" / "real_images"
SETTINGS = {"task": "caption", "prompt": "USER: <image>\nx\nASSISTANT:", "generation": {"max_new_tokens": 100}}
CAPTION = "a previous caption " * 5  # ~100 characters, the length of a real caption


# ---------------------------------------------------------------------------------------------
# What runs in the fresh interpreter of one revision (`--child`)
# ---------------------------------------------------------------------------------------------


def child_write_journal(folder: str, journal: str) -> dict:
    """The journal a finished run leaves, written by this revision's own functions."""
    from jjvmed import journal as jl
    from jjvmed.images import scan_folder
    from jjvmed.records import Record

    digest = getattr(__import__("jjvmed.files", fromlist=["x"]), "file_digest", None)  # None before digests
    with open(journal, "wb") as fh:
        fh.write(jl.header_line(SETTINGS, folder))
        for image_id, path in scan_folder(folder).items:
            extra = (digest(path),) if digest else ()
            fh.write(jl.record_line(Record(image_id, CAPTION), jl.file_identity(path), *extra))
    return {}


def child_time(folder: str, journal: str) -> dict:
    """Seconds for the listing and for the resume up to the selection of what is left."""
    import inspect

    from jjvmed.images import scan_folder
    from jjvmed.journal import file_identity, open_journal

    start = time.perf_counter()
    items = scan_folder(folder).items
    listed = time.perf_counter()
    takes_paths = "files" in inspect.signature(open_journal).parameters
    if takes_paths:  # this checkout: the journal takes the paths and compares the files itself
        j = open_journal(Path(journal), SETTINGS, folder, dict(items), "auto", False, False, 1)
    else:  # before: the run computed the identities and handed them over
        identities = {i: file_identity(p) for i, p in items}
        j = open_journal(Path(journal), SETTINGS, folder, identities, "auto", False, False, 1)
    todo = [(i, p) for i, p in items if not (i in j.records and j.records[i].ok)]
    resumed = time.perf_counter()
    j.close()
    assert len(items) == len(j.records) and not todo, (len(items), len(j.records), len(todo))
    return {"listing": listed - start, "resume": resumed - listed}


def child_decode(paths: list[str]) -> dict:
    """Seconds per image: decode alone, CRC-32 + decode, SHA-256 + decode, and each digest alone."""
    import hashlib

    from jjvmed.files import file_digest
    from jjvmed.images import load_image

    def sha256(path: str) -> str:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    ways = {"load_image": lambda p: load_image(p), "CRC-32 + load_image": lambda p: (file_digest(p), load_image(p)),
            "SHA-256 + load_image": lambda p: (sha256(p), load_image(p)), "CRC-32 alone": file_digest,
            "SHA-256 alone": sha256}
    for p in paths:  # untimed: imports, decoder set-up, page cache
        ways["SHA-256 + load_image"](p)
    names = list(ways)
    spent = dict.fromkeys(names, 0.0)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:  # interleaved: A B C, B C A, C A B
            start = time.perf_counter()
            for p in paths:
                ways[name](p)
            spent[name] += time.perf_counter() - start
    return {name: seconds / ROUNDS / len(paths) for name, seconds in spent.items()}


ROUNDS = 3  # decoding rounds per interpreter, one per contender order


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.child)
    what = {"write": lambda: child_write_journal(args.folder, args.journal),
            "time": lambda: child_time(args.folder, args.journal),
            "decode": lambda: child_decode(sorted(str(p) for p in REAL_IMAGES.glob("*.png")))}[args.phase]
    print(json.dumps(what()))


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def run_child(root: Path, phase: str, folder: Path | None = None, journal: Path | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, __file__, "--child", str(root), "--phase", phase]
    if folder:
        cmd += ["--folder", str(folder), "--journal", str(journal)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode:
        raise SystemExit(f"{phase} in {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def checkout(rev: str, into: Path) -> Path:
    """The library of revision `rev` alone, unpacked from git."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "jjvmed"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def make_folder(folder: Path, count: int) -> None:
    """`count` distinct small PNG files, named as the 2025 test set names its images."""
    folder.mkdir()
    data = (REAL_IMAGES / "REAL_DICOM_007.png").read_bytes()[:2000]  # never decoded: listed and compared only
    for n in range(1, count + 1):
        (folder / f"ImageCLEFmedical_Caption_2025_test_{n}.png").write_bytes(data)


def make_linked_folder(folder: Path, count: int) -> None:
    """`count` hard links to the shipped real PNGs: real sizes, warm page cache."""
    folder.mkdir()
    sources = sorted(REAL_IMAGES.glob("*.png"))
    for n in range(1, count + 1):
        os.link(sources[n % len(sources)], folder / f"ImageCLEFmedical_Caption_2025_test_{n}.png")


def stats(values: list[float], scale: float) -> str:
    return " / ".join(f"{v * scale:.1f}" for v in (min(values), statistics.median(values), max(values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="git revision to compare with (default: the branch point "
                        "of this checkout with main)")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--journal", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    before = args.before or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True,
                                           text=True, check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="jj-vmed-listing-"))
    try:
        roots = {f"before ({before[:10]})": checkout(before, work / "before"), "after (this checkout)": ROOT}
        folder = work / "images"
        make_folder(folder, args.images)
        linked = work / "linked"
        make_linked_folder(linked, args.images)
        journals = {name: work / f"{n}.journal.jsonl" for n, name in enumerate(roots)}
        for name, root in roots.items():
            run_child(root, "write", folder, journals[name])
        after = list(roots)[1]
        run_child(ROOT, "write", linked, work / "linked.journal.jsonl")
        # A new ctime on every file, the same bytes and times. Hard links share one inode: one chmod per
        # shipped PNG gives every link to it the new ctime.
        for path in {os.stat(p).st_ino: p for p in linked.iterdir()}.values():
            os.chmod(path, 0o640)

        times: dict[tuple[str, str], list[float]] = {}
        decode: dict[str, list[float]] = {}
        names = list(roots)
        for r in range(args.repeats):
            order = names[r % 2:] + names[:r % 2]
            for name in order:
                for phase, seconds in run_child(roots[name], "time", folder, journals[name]).items():
                    times.setdefault((phase, name), []).append(seconds)
            copied = run_child(ROOT, "time", linked, work / "linked.journal.jsonl")
            times.setdefault(("resume, every ctime new", after), []).append(copied["resume"])
            for way, seconds in run_child(ROOT, "decode").items():
                decode.setdefault(way, []).append(seconds)

        print(f"\n{args.images:,} images, {args.repeats} interleaved repeats, one fresh interpreter per run, "
              f"Python {sys.version.split()[0]}, {os.cpu_count()} cores\n")
        print("| phase | revision | ms min / median / max |")
        print("|---|---|---:|")
        for (phase, name), values in times.items():
            print(f"| {phase} | {name} | {stats(values, 1e3)} |")
        base = statistics.median(decode["load_image"])
        print(f"\nDecoding worker, per image ({len(list(REAL_IMAGES.glob('*.png')))} real PNGs, 306 KB on average):\n")
        print("| work per image | ms min / median / max | vs load_image (median) |")
        print("|---|---:|---:|")
        for way, values in decode.items():
            print(f"| {way} | {stats(values, 1e3)} | {statistics.median(values) / base:.3f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
