"""The journal alone (no model): what a resume keeps, what it refuses, what it sets aside, and what a
failed or cut-off write leaves behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import fill_the_disk, make_image_files

from jjvmed import journal as jl
from jjvmed.errors import UserError
from jjvmed.files import file_digest, file_identity
from jjvmed.journal import HEADER_START, Journal, header_line, open_journal, read_journal, record_line
from jjvmed.records import Record

SETTINGS = {"task": "caption", "prompt": "USER: <image>\nx\nASSISTANT:", "generation": {"max_new_tokens": 8}}
FOLDER = "/data/images"


def write_journal(path: Path, files: dict[str, str], settings: dict = SETTINGS, folder: str = FOLDER) -> None:
    """The journal a finished run on `files` leaves: one record per image, its identity and digest."""
    lines = [header_line(settings, folder)]
    lines += [record_line(Record(i, f"caption of {i}"), file_identity(p), file_digest(p)) for i, p in files.items()]
    path.write_bytes(b"".join(lines))


def resume(path: Path, files: dict[str, str], settings: dict = SETTINGS, folder: str = FOLDER, **options) -> Journal:
    options = {"resume": "auto", "force_resume": False, "overwrite": False, **options}
    return open_journal(path, settings, folder, files, options["resume"], options["force_resume"],
                        options["overwrite"], 1)


def test_a_resume_keeps_every_record_of_an_unchanged_file(tmp_path):
    files = make_image_files(tmp_path / "images", 3)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    kept = resume(path, files)
    assert kept.records == {i: Record(i, f"caption of {i}") for i in files}
    kept.close()


def test_an_image_of_another_size_or_time_is_generated_again(tmp_path, capsys):
    files = make_image_files(tmp_path / "images", 3)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    Path(files["img_0"]).write_bytes(b"another picture")
    stat = os.stat(files["img_1"])
    os.utime(files["img_1"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    kept = resume(path, files)
    assert sorted(kept.records) == ["img_2"]
    assert "2 image(s) changed" in capsys.readouterr().err


def test_an_image_replaced_by_one_of_the_same_size_with_its_time_restored_is_generated_again(tmp_path):
    files = make_image_files(tmp_path / "images", 3)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    target = Path(files["img_0"])
    before = target.stat()
    target.write_bytes(Path(files["img_1"]).read_bytes())  # the same size: every file here has 1,100 bytes
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert sorted(resume(path, files).records) == ["img_1", "img_2"]


def test_an_image_with_the_same_bytes_and_times_but_a_new_ctime_is_kept_after_comparing_its_content(tmp_path,
                                                                                                      capsys):
    files = make_image_files(tmp_path / "images", 3)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    for p in files.values():
        os.chmod(p, 0o640)  # what a copy with its times kept shows too: the same bytes, a new ctime
    assert all(file_identity(p)[2] != json.loads(line)["file"][2]
               for p, line in zip(files.values(), path.read_text().splitlines()[1:], strict=True))
    assert sorted(resume(path, files).records) == sorted(files)
    assert "compared by content, 0 changed" in capsys.readouterr().err


def test_a_new_ctime_without_a_recorded_digest_is_generated_again(tmp_path):
    files = make_image_files(tmp_path / "images", 1)
    path = tmp_path / "c.journal.jsonl"
    path.write_bytes(header_line(SETTINGS, FOLDER) + record_line(Record("img_0", "x"), file_identity(files["img_0"])))
    os.chmod(files["img_0"], 0o640)
    assert resume(path, files).records == {}


def test_a_version_2_journal_is_compared_on_size_and_modification_time(tmp_path):
    files = make_image_files(tmp_path / "images", 2)
    path = tmp_path / "c.journal.jsonl"
    path.write_bytes(header_line(SETTINGS, FOLDER) + b"".join(
        record_line(Record(i, "old"), file_identity(p)[:2]) for i, p in files.items()))
    Path(files["img_1"]).write_bytes(b"changed")
    assert sorted(resume(path, files).records) == ["img_0"]


def test_other_settings_or_another_folder_are_refused_naming_the_difference(tmp_path):
    files = make_image_files(tmp_path / "images", 1)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    with pytest.raises(UserError, match=r"task: 'caption' -> 'concepts'.*--force_resume"):
        resume(path, files, {**SETTINGS, "task": "concepts"})
    with pytest.raises(UserError, match=r"image folder: /data/images -> /elsewhere"):
        resume(path, files, folder="/elsewhere")
    assert sorted(resume(path, files, {**SETTINGS, "task": "concepts"}, force_resume=True).records) == ["img_0"]


@pytest.mark.parametrize("settings, shown", [([1, 2], "a list"), (42, "a number"), ("caption", "a string"),
                                             (None, "null"), (True, "true/false")])
def test_settings_of_the_wrong_json_type_are_refused_as_unreadable(tmp_path, settings, shown):
    files = make_image_files(tmp_path / "images", 1)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = json.dumps({**json.loads(lines[0]), "settings": settings}) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(UserError, match=f"settings: unreadable in the journal \\({shown} instead of an object\\)"):
        resume(path, files)
    assert sorted(resume(path, files, force_resume=True).records) == ["img_0"]


def test_a_line_of_deeply_nested_brackets_is_set_aside_and_its_image_redone(tmp_path, capsys):
    files = make_image_files(tmp_path / "images", 3)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"[" * 300_000 + b"\n"  # in place of img_1's record
    path.write_bytes(b"".join(lines))
    kept = resume(path, files)
    assert sorted(kept.records) == ["img_0", "img_2"]
    assert "1 damaged line(s)" in capsys.readouterr().err
    side = list(tmp_path.glob("c.journal.jsonl.damaged-*.txt"))
    assert len(side) == 1 and side[0].read_bytes().startswith(b"line 3: [[[")
    assert read_journal(path).bad_lines == []  # the journal itself holds good lines only now


@pytest.mark.parametrize("line", [
    b'{"id": "img_1", "text": 7, "error": null, "file": []}',
    b'{"id": "img_1", "text": "x", "error": null, "file": 3}',
    b'{"id": "img_1", "text": "x", "error": null, "file": [], "crc32": 5}',
    b'{"id": "", "text": "x", "error": null}',
    b'{"id": "img_1", "text": "caf\\udce9", "error": null, "file": []}',  # a lone surrogate: no CSV can hold it
    b'{"id": "img_1", "text": "x", "error": ["no"], "file": []}',
    b'"just a string"',
    b"\xff\xfe not even text",
])
def test_lines_of_wrong_types_or_unwritable_text_are_set_aside(tmp_path, line):
    files = make_image_files(tmp_path / "images", 1)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    with open(path, "ab") as fh:
        fh.write(line + b"\n")
    contents = read_journal(path)
    assert [raw for _, raw in contents.bad_lines] == [line] and sorted(contents.records) == ["img_0"]


def test_a_torn_last_line_is_dropped_and_the_next_append_starts_on_a_fresh_line(tmp_path):
    files = make_image_files(tmp_path / "images", 3)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # a kill in the middle of img_2's record
    kept = resume(path, files)
    assert sorted(kept.records) == ["img_0", "img_1"]
    kept.append([Record("img_2", "again")], {})
    kept.close()
    assert read_journal(path).records["img_2"] == Record("img_2", "again")
    assert read_journal(path).bad_lines == []


@pytest.mark.parametrize("data", [b"", b"{", b'{"jour', HEADER_START, HEADER_START + b', "version": 3, "sett'])
@pytest.mark.parametrize("flag", [None, "auto"])
def test_a_journal_cut_off_before_its_first_line_ended_is_started_over(tmp_path, data, flag, capsys):
    files = make_image_files(tmp_path / "images", 1)
    path = tmp_path / "c.journal.jsonl"
    path.write_bytes(data)
    started = resume(path, files, resume=flag)
    assert started.records == {} and "starting it over" in capsys.readouterr().err
    started.append([Record("img_0", "new")], {})
    started.close()
    assert read_journal(path).records == {"img_0": Record("img_0", "new")}


@pytest.mark.parametrize("data", [b"hello\n", b"hello", b'{"journal": "other"}\n', b"[" * 100_000 + b"\n"])
def test_a_file_that_is_not_a_journal_is_refused_not_overwritten(tmp_path, data):
    path = tmp_path / "c.journal.jsonl"
    path.write_bytes(data)
    with pytest.raises(UserError, match="not a JJ-VMed checkpoint journal"):
        resume(path, {})
    assert path.read_bytes() == data


def test_an_existing_journal_needs_a_resume_flag_or_overwrite(tmp_path):
    files = make_image_files(tmp_path / "images", 2)
    path = tmp_path / "c.journal.jsonl"
    write_journal(path, files)
    with pytest.raises(UserError, match=r"\(2 images done\); add --resume_from_checkpoint auto"):
        resume(path, files, resume=None)
    assert resume(path, files, resume=None, overwrite=True).records == {}
    assert not path.exists()  # created again with the first records


def test_an_explicit_journal_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no such journal"):
        resume(tmp_path / "typo.jsonl", {}, resume=str(tmp_path / "typo.jsonl"))


def test_a_full_disk_at_the_first_write_leaves_no_journal(tmp_path, monkeypatch):
    path = tmp_path / "c.journal.jsonl"
    started = resume(path, {})

    def open_on_a_full_disk(*args, **kwargs):
        fh = open(*args, **kwargs)
        fill_the_disk(fh)
        return fh

    monkeypatch.setattr(jl, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError, match="No space left") as raised:
        started.append([Record("img_0", "x")], {})
    started.close()
    assert raised.value.filename == str(path)
    assert not path.exists()


def test_a_full_disk_later_keeps_the_batches_before_it(tmp_path):
    path = tmp_path / "c.journal.jsonl"
    started = resume(path, {})
    started.append([Record("img_0", "first")], {})
    fill_the_disk(started.fh)
    with pytest.raises(OSError, match="No space left"):
        started.append([Record("img_1", "second")], {})
    started.close()  # no second error on the way out
    assert read_journal(path).records == {"img_0": Record("img_0", "first")}


def test_records_keep_the_identity_at_the_start_and_the_digest_of_the_bytes_decoded(tmp_path):
    files = make_image_files(tmp_path / "images", 2)
    path = tmp_path / "c.journal.jsonl"
    started = resume(path, files)
    started.append([Record("img_0", "a"), Record("img_1", "", "OSError: unreadable")], {"img_0": "ab" * 4})
    started.close()
    contents = read_journal(path)
    assert contents.identities == {i: file_identity(p) for i, p in files.items()}
    assert contents.digests == {"img_0": "ab" * 4}
