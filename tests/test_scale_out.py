"""Scale-out: torchrun processes and manual shards give the same CSVs as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, ROCOV2, ROOT, needs_rocov2, read_csv, run_in_process, tiny_args


def model_args(tiny_model: Path, out: Path) -> list[str]:
    """The tiny-model caption run every test here compares, in batches of 3."""
    return tiny_args(tiny_model, out, REAL_IMAGES, "--batch_size", "3")


def run_captions(*args: str) -> subprocess.CompletedProcess:
    """generate_captions.py in this process: exit code and stderr."""
    return run_in_process("generate_captions.py", *args)


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / script), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def single_captions(tiny_model, tmp_path_factory) -> list[list[str]]:
    out = tmp_path_factory.mktemp("single") / "captions.csv"
    assert run_captions(*model_args(tiny_model, out)).returncode == 0
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


@needs_rocov2
def test_torchrun_concepts_match_a_single_process_run(tiny_model, tmp_path):
    def args(folder: Path) -> list[str]:
        return [*model_args(tiny_model, folder / "concepts.csv"), "--output_csv_natural",
                str(folder / "natural.csv"), "--cui_mapping_file", str(ROCOV2)]

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    assert run_in_process("generate_concepts.py", *args(tmp_path / "one")).returncode == 0
    result = torchrun("generate_concepts.py", *args(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("concepts.csv", "natural.csv"):
        assert read_csv(tmp_path / "two" / name) == read_csv(tmp_path / "one" / name)


def test_manual_shards_and_merge_give_the_same_captions(tiny_model, tmp_path, single_captions):
    out = tmp_path / "captions.csv"
    for index in ("0", "1"):
        shard = run_captions(*model_args(tiny_model, out), "--num_shards", "2", "--shard_index", index)
        assert shard.returncode == 0, shard.stderr
        assert not out.exists()  # a shard only fills its journal
        # its summary counts its own images: half of the 18
        assert "images: 9 (generated now: 9, done before: 0)\n" in shard.stderr
    assert run_captions(*model_args(tiny_model, out), "--merge_shards").returncode == 0
    assert read_csv(out) == single_captions


def test_merge_names_a_missing_or_incomplete_shard(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    args = model_args(tiny_model, out)
    assert run_captions(*args, "--num_shards", "3", "--shard_index", "1").returncode == 0
    merge = run_captions(*args, "--merge_shards")
    assert merge.returncode == 2
    assert "shard 0 of 3 is missing" in merge.stderr and "shard 2 of 3 is missing" in merge.stderr
    for index in ("0", "2"):
        assert run_captions(*args, "--num_shards", "3", "--shard_index", index).returncode == 0
    journal = tmp_path / "captions.shard-00002-of-00003.journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:-2]))  # killed before the end
    merge = run_captions(*args, "--merge_shards")
    assert merge.returncode == 2 and "shard 2 of 3 is incomplete: 2 of 6 images missing" in merge.stderr
    # rerunning the killed shard redoes only its missing images
    rerun = run_captions(*args, "--num_shards", "3", "--shard_index", "2", "--resume_from_checkpoint", "auto")
    assert rerun.returncode == 0 and "generated now: 2" in rerun.stderr
    assert run_captions(*args, "--merge_shards").returncode == 0
    assert len(read_csv(out)) == 19


def test_shards_with_different_settings_are_not_merged(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    args = model_args(tiny_model, out)
    assert run_captions(*args, "--num_shards", "2", "--shard_index", "0").returncode == 0
    assert run_captions(*args, "--num_shards", "2", "--shard_index", "1", "--language", "en").returncode == 0
    merge = run_captions(*args, "--merge_shards")
    assert merge.returncode == 2 and "shard 1 was run with other settings" in merge.stderr


def test_stale_shards_of_another_run_are_not_merged_by_this_command(tiny_model, tmp_path):
    out = tmp_path / "captions.csv"
    args = model_args(tiny_model, out)
    for index in ("0", "1"):
        assert run_captions(*args, "--num_shards", "2", "--shard_index", index, "--language", "en").returncode == 0
    merge = run_captions(*args, "--merge_shards")  # Spanish prompt: not what the shards generated
    assert merge.returncode == 2 and "shard 0 was run with other settings than this command" in merge.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [(["--shard_index", "1"], "--shard_index needs --num_shards"),
                                            (["--num_shards", "2", "--shard_index", "2"], "between 0 and 1")])
def test_bad_shard_arguments_are_clear_errors(tiny_model, tmp_path, extra, message):
    result = run_captions(*model_args(tiny_model, tmp_path / "c.csv"), *extra)
    assert result.returncode == 2 and message in result.stderr


def test_merge_refuses_a_shard_whose_image_changed_since_it_ran(tiny_model, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(REAL_IMAGES, images)
    out = tmp_path / "captions.csv"
    args = tiny_args(tiny_model, out, images, "--batch_size", "3")
    for index in ("0", "1"):
        assert run_captions(*args, "--num_shards", "2", "--shard_index", index).returncode == 0
    shutil.copy(REAL_IMAGES / "REAL_DICOM_010.png", images / "REAL_DICOM_002.png")  # shard 1's, other picture
    merge = run_captions(*args, "--merge_shards")
    assert merge.returncode == 2, merge.stderr
    assert "shard 1 of 2" in merge.stderr and "changed" in merge.stderr and "--shard_index 1" in merge.stderr
    assert not out.exists()
    rerun = run_captions(*args, "--num_shards", "2", "--shard_index", "1", "--resume_from_checkpoint", "auto")
    assert rerun.returncode == 0 and "generated now: 1" in rerun.stderr
    assert run_captions(*args, "--merge_shards").returncode == 0
    whole = tmp_path / "whole.csv"
    assert run_captions(*tiny_args(tiny_model, whole, images, "--batch_size", "3")).returncode == 0
    assert read_csv(out) == read_csv(whole)
