"""Scale-out: torchrun processes and manual shards give the same CSVs as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, ROOT, SHARED_DATA, read_csv

import errors
import generate_captions
import generate_concepts

ROCOV2 = str(SHARED_DATA / "rocov2" / "cui_mapping.csv")


def model_args(tiny_model: Path, out: Path) -> list[str]:
    return ["--image_dir", str(REAL_IMAGES), "--output_csv", str(out), "--base_model_path", str(tiny_model),
            "--adapter_repo", "none", "--max_new_tokens", "8", "--batch_size", "3", "--num_workers", "0"]


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / script), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def single_captions(tiny_model, tmp_path_factory) -> list[list[str]]:
    out = tmp_path_factory.mktemp("single") / "captions.csv"
    assert errors.run_cli(generate_captions.main, model_args(tiny_model, out)) == 0
    return read_csv(out)


def test_torchrun_two_processes_give_the_same_captions_as_one(tiny_model, tmp_path, single_captions):
    out = tmp_path / "captions.csv"
    result = torchrun("generate_captions.py", *model_args(tiny_model, out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_csv(out) == single_captions
    journals = sorted(p.name for p in tmp_path.glob("*.journal.jsonl"))
    assert journals == ["captions.shard-00000-of-00002.journal.jsonl", "captions.shard-00001-of-00002.journal.jsonl"]
    first = [json.loads(line)["id"] for line in (tmp_path / journals[0]).read_text().splitlines()[1:]]
    assert first == [r[0] for r in single_captions[1::2]]  # every other image of the sorted IDs


def test_torchrun_concepts_match_a_single_process_run(tiny_model, tmp_path):
    def args(folder: Path) -> list[str]:
        return [*model_args(tiny_model, folder / "concepts.csv"), "--output_csv_natural",
                str(folder / "natural.csv"), "--cui_mapping_file", ROCOV2]

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    assert errors.run_cli(generate_concepts.main, args(tmp_path / "one")) == 0
    result = torchrun("generate_concepts.py", *args(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("concepts.csv", "natural.csv"):
        assert read_csv(tmp_path / "two" / name) == read_csv(tmp_path / "one" / name)


def test_manual_shards_and_merge_give_the_same_captions(tiny_model, tmp_path, single_captions, capsys):
    out = tmp_path / "captions.csv"
    for index in ("0", "1"):
        assert errors.run_cli(generate_captions.main, [*model_args(tiny_model, out), "--num_shards", "2",
                                                       "--shard_index", index]) == 0
        assert not out.exists()  # a shard only fills its journal
    assert errors.run_cli(generate_captions.main, [*model_args(tiny_model, out), "--merge_shards"]) == 0
    assert read_csv(out) == single_captions


def test_merge_names_a_missing_or_incomplete_shard(tiny_model, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    args = model_args(tiny_model, out)
    assert errors.run_cli(generate_captions.main, [*args, "--num_shards", "3", "--shard_index", "1"]) == 0
    assert errors.run_cli(generate_captions.main, [*args, "--merge_shards"]) == 2
    err = capsys.readouterr().err
    assert "shard 0 of 3 is missing" in err and "shard 2 of 3 is missing" in err
    for index in ("0", "2"):
        assert errors.run_cli(generate_captions.main, [*args, "--num_shards", "3", "--shard_index", index]) == 0
    journal = tmp_path / "captions.shard-00002-of-00003.journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:-2]))  # killed before the end
    capsys.readouterr()
    assert errors.run_cli(generate_captions.main, [*args, "--merge_shards"]) == 2
    assert "shard 2 of 3 is incomplete: 2 of 6 images missing" in capsys.readouterr().err
    # rerunning the killed shard redoes only its missing images
    assert errors.run_cli(generate_captions.main, [*args, "--num_shards", "3", "--shard_index", "2",
                                                   "--resume_from_checkpoint", "auto"]) == 0
    assert "generated now: 2" in capsys.readouterr().err
    assert errors.run_cli(generate_captions.main, [*args, "--merge_shards"]) == 0
    assert len(read_csv(out)) == 19


def test_shards_with_different_settings_are_not_merged(tiny_model, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    args = model_args(tiny_model, out)
    assert errors.run_cli(generate_captions.main, [*args, "--num_shards", "2", "--shard_index", "0"]) == 0
    assert errors.run_cli(generate_captions.main, [*args, "--num_shards", "2", "--shard_index", "1",
                                                   "--language", "en"]) == 0
    assert errors.run_cli(generate_captions.main, [*args, "--merge_shards"]) == 2
    assert "shard 1 was run with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--shard_index", "1"], "--shard_index needs --num_shards"),
                                            (["--num_shards", "2", "--shard_index", "2"], "between 0 and 1")])
def test_bad_shard_arguments_are_clear_errors(tiny_model, tmp_path, capsys, extra, message):
    assert errors.run_cli(generate_captions.main, [*model_args(tiny_model, tmp_path / "c.csv"), *extra]) == 2
    assert message in capsys.readouterr().err
