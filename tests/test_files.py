"""The files the tool writes (whole or not at all, readable by colleagues), the lock, and what identifies
a file the tool read."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, hold_lock

from jjvmed import files
from jjvmed.errors import UserError
from jjvmed.files import (
    check_writable,
    file_digest,
    file_identity,
    lock_exclusive,
    write_bytes_atomic,
    write_csv_atomic,
)


def test_an_atomic_write_replaces_the_whole_file_and_removes_stale_temporary_files(tmp_path):
    target = tmp_path / "out" / "captions.csv"
    write_bytes_atomic(target, b"old")
    stale = target.with_name(".captions.csv.k1ll3d.tmp")
    stale.write_bytes(b"half a file from a killed write")
    write_bytes_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["captions.csv"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "captions.csv"
    target.write_bytes(b"the submission of yesterday")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(target, b"x" * 1000)
    assert target.read_bytes() == b"the submission of yesterday"
    assert [p.name for p in tmp_path.iterdir()] == ["captions.csv"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_a_plain_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = write_bytes_atomic(tmp_path / "c.csv", b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_csv_fields_are_quoted_only_where_needed_with_newline_line_ends(tmp_path):
    path = write_csv_atomic(tmp_path / "c.csv", ["ID", "Caption"],
                            [["a", "plain"], ["b", "with, comma"], ["c", 'a "quote"'], ["d", "two\nlines"]])
    assert path.read_bytes() == b'ID,Caption\na,plain\nb,"with, comma"\nc,"a ""quote"""\nd,"two\nlines"\n'


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_writable(tmp_path, "output")
    with pytest.raises(UserError, match="cannot write the output /proc/jj-vmed/c.csv"):
        check_writable("/proc/jj-vmed/c.csv", "output")
    check_writable(tmp_path / "new" / "deeper" / "c.csv", "output")  # folders that do not exist yet: fine
    assert not (tmp_path / "new").exists()


def test_a_second_process_is_refused_the_lock_naming_the_holder_and_what_to_change(tmp_path):
    path = tmp_path / "ck" / "captions.journal.jsonl"
    holder = hold_lock(path)
    try:
        with pytest.raises(UserError) as refused, lock_exclusive(path, "give this run another --checkpoint_dir"):
            pass
        assert str(refused.value) == (f"another run (PID {holder.pid}) is using {path}; wait for it to end, or give "
                                      "this run another --checkpoint_dir")
        with pytest.raises(UserError, match="or give this run another --output_csv$"), lock_exclusive(path):
            pass
    finally:
        holder.communicate("")
    with lock_exclusive(path):  # released when the holder ended
        pass


def test_a_released_lock_leaves_no_side_file_and_can_be_taken_again(tmp_path):
    path = tmp_path / "captions.csv"
    with lock_exclusive(path):
        assert (tmp_path / ".captions.csv.lock").exists()
    assert list(tmp_path.iterdir()) == []
    with lock_exclusive(path):  # a fresh side file
        pass


def test_a_forked_worker_stopped_at_once_leaves_the_parents_lock_in_place(tmp_path):
    from jjvmed.errors import UNDO_AT_EXIT

    path = tmp_path / "captions.csv"
    with lock_exclusive(path):
        child = os.fork()
        if child == 0:  # what an image-decoding worker does on a signal before it ignores them
            for undo in list(UNDO_AT_EXIT.values()):
                undo()
            os._exit(0)
        os.waitpid(child, 0)
        assert (tmp_path / ".captions.csv.lock").exists()
        second = subprocess.run([sys.executable, "-c", "import sys; from jjvmed.files import lock_exclusive\n"
                                 "try:\n    with lock_exclusive(sys.argv[1]): print('took it')\n"
                                 "except Exception as e: print(e)", str(path)],
                                capture_output=True, text=True, cwd=ROOT)
        assert "another run" in second.stdout, second.stdout + second.stderr


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    path = tmp_path / "captions.csv"
    holder = hold_lock(path)
    holder.kill()
    holder.wait()
    with lock_exclusive(path):
        pass


def test_the_identity_of_a_file_changes_when_it_is_replaced_with_its_time_restored(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"one picture")
    before = file_identity(path)
    stat = path.stat()
    path.write_bytes(b"two picture")  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = file_identity(path)
    assert after[:2] == before[:2] and after != before
    assert file_identity(tmp_path / "missing.png") == []


def test_the_digest_tells_other_bytes_apart_and_a_copy_not(tmp_path):
    (tmp_path / "a.png").write_bytes(b"one picture")
    (tmp_path / "b.png").write_bytes(b"two picture")
    shutil.copy2(tmp_path / "a.png", tmp_path / "copy.png")
    digest = file_digest(tmp_path / "a.png")
    assert len(digest) == 8 and digest == file_digest(tmp_path / "copy.png")
    assert digest != file_digest(tmp_path / "b.png")
