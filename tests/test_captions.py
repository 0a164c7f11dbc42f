"""generate_captions.py end to end on the tiny LLaVA: rows, batching, errors, arguments."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, read_csv, run_in_process, run_script, tiny_args

import generate_captions
from jjvmed import errors, files, prompts


def captions(tiny_model: Path, out: Path, *extra: str, image_dir: Path = REAL_IMAGES) -> int:
    argv = ["--image_dir", str(image_dir), "--output_csv", str(out), "--base_model_path", str(tiny_model),
            "--adapter_repo", "none", "--max_new_tokens", "12", "--num_workers", "0", *extra]
    return errors.run_cli(generate_captions.main, argv)


def test_every_real_image_gets_one_caption_row(tiny_model, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    assert captions(tiny_model, out, "--num_workers", "2") == 0
    assert "the official checks say accepted" in capsys.readouterr().err
    rows = read_csv(out)
    assert rows[0] == ["ID", "Caption"]
    expected = sorted(p.stem for p in REAL_IMAGES.glob("*.png"))
    assert [r[0] for r in rows[1:]] == expected
    assert all(len(r) == 2 and r[1].strip() for r in rows[1:])


def test_batched_captions_equal_batch_size_one(tiny_model, tmp_path):
    assert captions(tiny_model, tmp_path / "b1.csv", "--batch_size", "1") == 0
    assert captions(tiny_model, tmp_path / "b5.csv", "--batch_size", "5") == 0
    assert read_csv(tmp_path / "b1.csv") == read_csv(tmp_path / "b5.csv")


def test_captions_depend_on_the_image(tiny_model, tmp_path):
    out = tmp_path / "c.csv"
    assert captions(tiny_model, out) == 0
    assert len({r[1] for r in read_csv(out)[1:]}) > 3


def test_corrupt_empty_and_non_image_files_are_reported_and_the_run_goes_on(tiny_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("REAL_DICOM_001.png", "REAL_DICOM_002.png"):
        shutil.copy(REAL_IMAGES / name, images / name)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("this is not an image")
    (images / "truncated.png").write_bytes((REAL_IMAGES / "REAL_DICOM_003.png").read_bytes()[:200])
    (images / "readme.txt").write_text("ignored: not an image extension")
    out = tmp_path / "captions.csv"
    assert captions(tiny_model, out, "--batch_size", "2", image_dir=images) == 0
    rows = dict(read_csv(out)[1:])
    assert sorted(rows) == ["REAL_DICOM_001", "REAL_DICOM_002", "empty", "notes", "truncated"]
    assert rows["REAL_DICOM_001"] and rows["REAL_DICOM_002"]
    assert rows["empty"] == rows["notes"] == rows["truncated"] == ""
    errors = dict(read_csv(tmp_path / "captions.errors.csv")[1:])
    assert sorted(errors) == ["empty", "notes", "truncated"]


def test_an_existing_journal_is_never_silently_overwritten(tiny_model, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    assert captions(tiny_model, out, "--limit", "3") == 0
    journal = out.with_name("captions.journal.jsonl").read_bytes()
    assert captions(tiny_model, out, "--limit", "3") == 2
    assert "--resume_from_checkpoint auto" in capsys.readouterr().err
    assert out.with_name("captions.journal.jsonl").read_bytes() == journal
    assert captions(tiny_model, out, "--limit", "3", "--overwrite") == 0


def test_resume_with_other_settings_is_refused_and_names_the_difference(tiny_model, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    assert captions(tiny_model, out, "--limit", "2") == 0
    code = captions(tiny_model, out, "--limit", "4", "--resume_from_checkpoint", "auto", "--language", "en")
    assert code == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "prompt" in err
    code = captions(tiny_model, out, "--limit", "4", "--resume_from_checkpoint", "auto", "--language", "en",
                    "--force_resume")
    assert code == 0 and len(read_csv(out)) == 5


def test_resume_auto_without_journal_starts_fresh(tiny_model, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    assert captions(tiny_model, out, "--limit", "2", "--resume_from_checkpoint", "auto") == 0
    assert "starting fresh" in capsys.readouterr().err
    assert len(read_csv(out)) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image_dir", "/no/such/folder"], "is not a folder"),
        (["--generation_kwargs", "{num_beams: 3}"], "not valid JSON"),
        (["--generation_kwargs", '{"num_beamz": 3}'], "unknown generate() settings: num_beamz"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--resume_from_checkpoint", "/no/such/journal.jsonl"], "no such journal"),
        (["--base_model_path", "/no/such/model"], "/no/such/model: no such folder"),
        (["--candidates", "4", "--generation_kwargs", '{"num_beams": 2}'],
         "num_beams 2 with --candidates 4: the 4 best beams need a beam search of at least 4 beams"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line_and_no_traceback(tiny_model, tmp_path, args, message):
    base = ["--image_dir", str(REAL_IMAGES), "--output_csv", str(tmp_path / "c.csv"),
            "--base_model_path", str(tiny_model), "--adapter_repo", "none"]
    result = run_script("generate_captions.py", *base, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "c.csv").exists()


def test_help_explains_every_option():
    result = run_script("generate_captions.py", "--help")
    assert result.returncode == 0
    for flag in ("--image_dir", "--output_csv", "--batch_size", "--max_new_tokens", "--base_model_path",
                 "--adapter_repo", "--merge_adapters", "--load_in_4bit", "--device", "--generation_kwargs",
                 "--checkpoint_interval", "--resume_from_checkpoint", "--prompt_template", "--language"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "raw, clean",
    [
        (" ASSISTANT: Caption: CT of the chest.", "CT of the chest."),
        ('Descripción: "Axial MRI  of the\nbrain."', "Axial MRI of the brain."),
        ("Plain x-ray of the pelvis.\nConceptos médicos clave: Pelvis", "Plain x-ray of the pelvis."),
        ("Ultrasound of the liver. USER: <image>", "Ultrasound of the liver."),
        ("", ""),
    ],
)
def test_caption_cleanup_strips_echoes_prefixes_and_whitespace(raw, clean):
    assert prompts.clean_caption(raw) == clean


def test_captions_with_commas_quotes_and_newlines_survive_a_csv_round_trip(tmp_path):
    tricky = ['CT, axial, with "contrast"', "line one\nline two", "plain"]
    rows = [[f"ID_{i}", c] for i, c in enumerate(tricky)]
    path = files.write_csv_atomic(tmp_path / "c.csv", ["ID", "Caption"], rows)
    assert list(csv.reader(io.StringIO(path.read_text(encoding="utf-8")))) == [["ID", "Caption"], *rows]
    assert [p.name for p in tmp_path.iterdir()] == ["c.csv"]  # no temp file left behind


def test_ctrl_c_while_the_model_loads_advises_no_resume_when_nothing_ran(tiny_model, tmp_path):
    """The signal arrives exactly as model loading starts (sent by the process to itself), so the outcome
    does not depend on timing: nothing has been generated, so there is nothing to resume."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "captions.csv"
    start = ("import os, signal, sys; sys.path.insert(0, sys.argv.pop(1)); import jjvmed.sources as s; "
             "real = s.load_model; s.load_model = lambda spec: (os.kill(os.getpid(), signal.SIGINT), real(spec))[1]; "
             "import generate_captions; from jjvmed.errors import run_cli; sys.exit(run_cli(generate_captions.main))")
    argv = ["--image_dir", str(REAL_IMAGES), "--output_csv", str(out), "--base_model_path", str(tiny_model),
            "--adapter_repo", "none", "--max_new_tokens", "4", "--num_workers", "0"]
    result = subprocess.run([sys.executable, "-c", start, str(ROOT), *argv], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 130, result.stderr
    assert "nothing was generated yet: rerun the same command" in result.stderr
    assert "--resume_from_checkpoint" not in result.stderr and "Traceback" not in result.stderr
    assert not out.with_name("captions.journal.jsonl").exists()


def test_sigterm_while_the_model_loads_leaves_no_lock_files_and_no_empty_folder(tiny_model, tmp_path):
    """The run stops at once before anything was generated: the lock side files (and the output folder made
    for them, still empty) go with it, as they do when a run ends normally."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "new" / "captions.csv"
    start = ("import os, signal, sys; sys.path.insert(0, sys.argv.pop(1)); import jjvmed.sources as s; "
             "real = s.load_model; s.load_model = lambda spec: (os.kill(os.getpid(), signal.SIGTERM), real(spec))[1]; "
             "import generate_captions; from jjvmed.errors import run_cli; sys.exit(run_cli(generate_captions.main))")
    result = subprocess.run([sys.executable, "-c", start, str(ROOT), *tiny_args(tiny_model, out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 143, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_to_start_leaves_no_empty_output_folder(tmp_path):
    out = tmp_path / "cu" / "captions.csv"
    result = run_in_process("generate_captions.py", *tiny_args(tmp_path / "no-model-here", out))
    assert result.returncode == 2 and "no-model-here: no such folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_shards_that_named_the_model_relative_merge_where_that_folder_is_absent(tiny_model, tmp_path, monkeypatch,
                                                                                capsys):
    out = tmp_path / "results" / "captions.csv"
    monkeypatch.chdir(tiny_model.parent)
    for index in ("0", "1"):
        assert captions(Path(tiny_model.name), out, "--num_shards", "2", "--shard_index", index) == 0
    monkeypatch.chdir(tmp_path)  # the machine that merges holds no model
    assert not Path(tiny_model.name).exists()
    assert captions(Path(tiny_model.name), out, "--merge_shards") == 0, capsys.readouterr().err
    assert len(read_csv(out)) == 1 + len(list(REAL_IMAGES.glob("*.png")))


def test_a_model_folder_spelled_another_way_resumes_and_so_do_journals_that_recorded_it_relative(tiny_model, tmp_path,
                                                                                                  monkeypatch, capsys):
    import json

    out = tmp_path / "captions.csv"
    assert captions(tiny_model, out, "--limit", "2") == 0
    monkeypatch.chdir(tiny_model.parent)
    relative = f"./{tiny_model.name}"
    assert captions(Path(relative), out, "--limit", "3", "--resume_from_checkpoint", "auto") == 0
    assert "generated now: 1, done before: 2" in capsys.readouterr().err
    # a journal of an older release holds the path as it was typed
    journal = out.with_name("captions.journal.jsonl")
    header, *records = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    settings = json.loads(header)
    settings["settings"]["base_model_path"] = relative
    journal.write_text(json.dumps(settings) + "\n" + "".join(records), encoding="utf-8")
    assert captions(tiny_model, out, "--limit", "4", "--resume_from_checkpoint", "auto") == 0
    assert "generated now: 1, done before: 3" in capsys.readouterr().err
