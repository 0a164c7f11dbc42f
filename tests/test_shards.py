"""Shards alone (no model): the split, the launcher's variables, and what --merge_shards refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_image_files

from jjvmed.errors import UserError
from jjvmed.files import file_digest, file_identity
from jjvmed.journal import default_journal_path, header_line, record_line
from jjvmed.records import Record
from jjvmed.shards import Shard, merge_shard_records, shard_from

SETTINGS = {"task": "caption", "prompt": "USER: <image>\nx\nASSISTANT:"}
FOLDER = "/data/images"


def run_shard(out: Path, files: dict[str, str], index: int, count: int, settings: dict = SETTINGS) -> Path:
    """The journal shard `index` of `count` leaves when it has done all its images."""
    shard = Shard(index, count)
    path = default_journal_path(out, None, shard.suffix)
    lines = [header_line(settings, FOLDER)]
    lines += [record_line(Record(i, f"caption of {i}"), file_identity(files[i]), file_digest(files[i]))
              for i in shard.take(list(files))]
    path.write_bytes(b"".join(lines))
    return path


def merge(out: Path, files: dict[str, str], settings: dict = SETTINGS) -> dict[str, Record]:
    return merge_shard_records(out, None, list(files), settings, FOLDER, files)


def test_shards_take_every_nth_image_and_together_take_each_once():
    ids = [f"img_{n}" for n in range(10)]
    parts = [Shard(i, 3).take(ids) for i in range(3)]
    assert parts[1] == ["img_1", "img_4", "img_7"]
    assert sorted(i for part in parts for i in part) == sorted(ids)
    assert Shard(2, 3).suffix == ".shard-00002-of-00003"


def test_a_launchers_processes_are_the_shards(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert shard_from(None, None) == Shard(2, 4, distributed=True)
    assert not Shard(2, 4, distributed=True).writes_csv and Shard(0, 4, distributed=True).writes_csv
    with pytest.raises(UserError, match="drop --num_shards/--merge_shards"):
        shard_from(2, 0)


@pytest.mark.parametrize("num, index, message", [(None, 1, "--shard_index needs --num_shards"),
                                                 (2, 2, "between 0 and 1"), (2, None, "between 0 and 1"),
                                                 (0, 0, "between 0 and 0")])
def test_bad_shard_options_are_one_clear_error(monkeypatch, num, index, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match=message):
        shard_from(num, index)


def test_merge_gives_every_shards_records(tmp_path):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    for index in range(2):
        run_shard(out, files, index, 2)
    assert merge(out, files) == {i: Record(i, f"caption of {i}") for i in files}


def test_merge_names_a_missing_or_incomplete_shard_with_the_command_to_finish_it(tmp_path):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    run_shard(out, files, 1, 3)
    journal = run_shard(out, files, 2, 3)
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:-1]))  # killed before its end
    with pytest.raises(UserError) as refused:
        merge(out, files)
    message = str(refused.value)
    assert "shard 0 of 3 is missing" in message
    assert "shard 2 of 3 is incomplete: 1 of 1 images missing (rerun it with --num_shards 3 --shard_index 2 " \
        "--resume_from_checkpoint auto, with the --ids_csv and --limit of this command)" in message


def test_merge_refuses_journals_of_runs_with_different_shard_counts(tmp_path):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    run_shard(out, files, 0, 2)
    run_shard(out, files, 0, 3)
    with pytest.raises(UserError, match=r"different shard counts: \[2, 3\]"):
        merge(out, files)


def test_merge_refuses_a_shard_run_with_other_settings(tmp_path):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    run_shard(out, files, 0, 2)
    run_shard(out, files, 1, 2, {**SETTINGS, "prompt": "other"})
    with pytest.raises(UserError, match=r"shard 1 was run with other settings than this command \(prompt: 'other'"):
        merge(out, files)


@pytest.mark.parametrize("settings", [[1], 3, "x", None])
def test_merge_refuses_a_shard_whose_settings_cannot_be_read(tmp_path, settings):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    run_shard(out, files, 0, 2)
    journal = run_shard(out, files, 1, 2)
    lines = journal.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), "settings": settings}) + "\n"
    journal.write_text("".join(lines))
    with pytest.raises(UserError, match="shard 1 was run with other settings.*settings: unreadable"):
        merge(out, files)


def test_merge_refuses_an_image_changed_since_its_shard_ran(tmp_path):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    for index in range(2):
        run_shard(out, files, index, 2)
    target = Path(files["img_3"])  # shard 1's
    before = target.stat()
    target.write_bytes(Path(files["img_1"]).read_bytes())  # the same size, other bytes, the old time
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(UserError, match=r"shard 1 of 2: 1 image\(s\) changed since it ran \(img_3; rerun it with "
                                        r"--num_shards 2 --shard_index 1 --resume_from_checkpoint auto\)"):
        merge(out, files)


def test_merge_accepts_images_with_the_same_bytes_and_times_but_a_new_ctime(tmp_path):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    for index in range(2):
        run_shard(out, files, index, 2)
    for path in files.values():
        os.chmod(path, 0o640)
    assert sorted(merge(out, files)) == sorted(files)


def test_a_shard_journal_cut_off_at_its_first_write_counts_as_incomplete(tmp_path):
    files = make_image_files(tmp_path / "images", 5)
    out = tmp_path / "captions.csv"
    run_shard(out, files, 0, 2)
    run_shard(out, files, 1, 2).write_bytes(b"")  # a full disk at its first write
    with pytest.raises(UserError, match="shard 1 of 2 is incomplete: 2 of 2 images missing"):
        merge(out, files)
