"""Crash safety: a killed or interrupted run resumes with no row lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, ROOT, read_csv, run_in_process, run_script, tiny_args


def base_args(tiny_model: Path, out: Path) -> list[str]:
    # batch 1 and longer answers make the run slow enough to be stopped half-way
    return tiny_args(tiny_model, out, REAL_IMAGES, "--max_new_tokens", "48", "--batch_size", "1", "--num_workers", "1")


def journal_records(path: Path) -> int:
    return max(0, path.read_bytes().count(b"\n") - 1) if path.exists() else 0


def start_and_stop_midway(args: list[str], journal: Path, sig: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate_captions.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while journal_records(journal) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def test_resume_after_sigkill_gives_the_same_csv_as_an_uninterrupted_run(tiny_model, tmp_path):
    full = tmp_path / "full" / "captions.csv"
    assert run_script("generate_captions.py", *base_args(tiny_model, full)).returncode == 0

    out = tmp_path / "killed" / "captions.csv"
    journal = out.with_name("captions.journal.jsonl")
    proc = start_and_stop_midway(base_args(tiny_model, out), journal, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = journal_records(journal)
    assert 5 <= done < 18, "the run should have been killed half-way"
    assert not out.exists()

    resumed = run_script("generate_captions.py", *base_args(tiny_model, out), "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"generated now: {18 - done}" in resumed.stderr
    assert read_csv(out) == read_csv(full)


def test_ctrl_c_stops_after_the_batch_with_exit_130_and_a_resume_hint(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    journal = out.with_name("captions.journal.jsonl")
    proc = start_and_stop_midway(base_args(tiny_model, out), journal, signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert "--resume_from_checkpoint auto" in stderr and "Traceback" not in stderr
    assert not out.exists()
    done = journal_records(journal)
    lines = journal.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line complete: the batch was finished
    resumed = run_script("generate_captions.py", *base_args(tiny_model, out), "--resume_from_checkpoint",
                         str(journal))
    assert resumed.returncode == 0
    assert f"generated now: {18 - done}" in resumed.stderr
    assert len(read_csv(out)) == 19


def test_a_torn_last_journal_line_is_dropped_and_redone(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "4")
    assert run_in_process("generate_captions.py", *args).returncode == 0
    first = read_csv(out)
    journal = out.with_name("captions.journal.jsonl")
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-2]) + lines[-2][:15])  # the kill hit in the middle of a write
    out.unlink()
    assert run_in_process("generate_captions.py", *args, "--resume_from_checkpoint", "auto").returncode == 0
    assert read_csv(out) == first
    records = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in records) == [r[0] for r in first[1:]]  # no ID twice, none lost


def test_damaged_journal_lines_are_set_aside_and_only_their_images_redone(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "4")
    assert run_in_process("generate_captions.py", *args).returncode == 0
    first = read_csv(out)
    journal = out.with_name("captions.journal.jsonl")
    lines = journal.read_text().splitlines()
    damaged = lines[2][: len(lines[2]) // 2]  # the second image's record, cut in half
    junk = ["[1, 2]", "null", '{"foo": 1}', '{"id": "x", "text": null, "error": null}', "not json at all"]
    journal.write_text("\n".join([lines[0], lines[1], damaged, *junk, *lines[3:]]) + "\n")

    result = run_script("generate_captions.py", *args, "--resume_from_checkpoint", "auto")
    assert result.returncode == 0, result.stderr
    assert "6 damaged line(s)" in result.stderr and "Traceback" not in result.stderr
    assert "generated now: 1" in result.stderr
    assert read_csv(out) == first
    side = list(tmp_path.glob("captions.journal.jsonl.damaged-*.txt"))
    assert len(side) == 1 and all(j in side[0].read_text() for j in junk)
    again = run_script("generate_captions.py", *args, "--resume_from_checkpoint", "auto")
    assert again.returncode == 0 and "damaged line" not in again.stderr and "generated now: 0" in again.stderr


def test_a_journal_line_of_deeply_nested_brackets_is_set_aside(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "3")
    assert run_in_process("generate_captions.py", *args).returncode == 0
    journal = out.with_name("captions.journal.jsonl")
    with open(journal, "ab") as fh:
        fh.write(b"[" * 300_000 + b"\n")
    result = run_in_process("generate_captions.py", *args, "--resume_from_checkpoint", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 damaged line(s)" in result.stderr and "generated now: 0" in result.stderr


@pytest.mark.parametrize("settings", ["[1, 2]", "42", '"caption"', "null"])
def test_a_journal_header_with_settings_of_the_wrong_type_is_refused_in_one_line(tiny_model, tmp_path, settings):
    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, REAL_IMAGES, "--limit", "2")
    assert run_in_process("generate_captions.py", *args).returncode == 0
    journal = out.with_name("captions.journal.jsonl")
    lines = journal.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    lines[0] = json.dumps({**header, "settings": json.loads(settings)}) + "\n"
    journal.write_text("".join(lines))
    result = run_in_process("generate_captions.py", *args, "--resume_from_checkpoint", "auto")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "settings" in result.stderr and "--force_resume" in result.stderr
    forced = run_in_process("generate_captions.py", *args, "--resume_from_checkpoint", "auto", "--force_resume")
    assert forced.returncode == 0, forced.stderr[-2000:]
