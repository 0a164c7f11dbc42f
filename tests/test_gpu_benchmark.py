"""benchmarks/gpu.sh and the throughput race it runs: the CPU dry run of the GPU plan gives the full table,
a run stopped by its time limit still prints the table so far, and the answer check compares something.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402

CONFIGURATIONS = [  # the GPU plan's rows, in its order: compiled first, then eager, then the A/B at batch 32
    "generate only, batch 128, compiled", "generate only, batch 32, compiled", "generate only, batch 8, compiled",
    "generate only, batch 128", "generate only, batch 32", "generate only, batch 8",
    "generate only, batch 32, compiled, transformers' SDPA attention",
    "generate only, batch 32, transformers' SDPA attention",
]


def table_rows(text: str) -> dict[str, list[str]]:
    """{configuration: its cells} from the last markdown table in `text`."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| generate only") and len(cells) == 8:
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_configuration_of_the_gpu_plan(tmp_path):
    """What the GPU will run, on CPU (tiny model, 2 new tokens, compile backend eager), once each."""
    results = tmp_path / "not" / "yet" / "there"
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS_DIR": str(results), "LIMIT_S": "600"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--repeats", "1"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    assert list(rows) == CONFIGURATIONS
    for name, cells in rows.items():
        assert cells[2] == "1", name  # timed once: not skipped, not failed
        assert "RECOMPILED" not in cells[7] and "CHANGED" not in cells[7], name
    assert rows["generate only, batch 128"][7] == "reference"
    assert rows["generate only, batch 128, compiled"][7].startswith("128/128 · 128/128 · 2 of 2 (vs batch 128)")
    assert "unmerged / merged:" in done.stdout and "same greedy tokens: yes" in done.stdout
    assert table_rows((results / "throughput.md").read_text()) == rows
    assert "generate only, batch 8" in (results / "gpu.log").read_text()


@pytest.mark.slow
def test_a_run_stopped_by_its_time_limit_prints_the_table_so_far():
    argv = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--dry_run", "--max_new_tokens", "2",
            "--contenders", "generate", "--compile", "off", "--batch_sizes", "4", "--num_images", "4",
            "--repeats", "1000"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "generate only, batch 4: " in line:  # its first timed run is done
                proc.send_signal(signal.SIGTERM)  # as `timeout` does
                break
        out = "".join(lines) + proc.stdout.read()
        code = proc.wait(timeout=120)
    assert code == 130
    assert "STOPPED after" in out
    runs = int(table_rows(out)["generate only, batch 4"][2])
    assert 1 <= runs < 1000


def answered(name: str, compiled: bool, texts: dict[str, str]) -> throughput.Config:
    config = throughput.Config(name, "generate", 2, compiled, [(i, "") for i in texts])
    config.texts, config.rates = texts, [1.0]
    return config


@pytest.mark.parametrize("cuda", [False, True])
def test_the_answer_check_fails_when_compiled_answers_leave_the_eager_ones_at_the_first_decoding_step(cuda):
    eager = answered("generate only, batch 2", False, {"a": "5 6 7 8 9", "b": "1 2 3 4 5"})
    same = answered("generate only, batch 2, compiled", True, {"a": "5 6 7 8 9", "b": "1 2 3 4 5"})
    assert throughput.check_answers([eager, same], cuda, agreement=0.9, tokens=4)
    assert same.agreement == "2/2 · 2/2 · 5 of 5"
    broken = answered("generate only, batch 2, compiled", True, {"a": "5 0 7 8 9", "b": "1 9 3 4 5"})
    assert not throughput.check_answers([eager, broken], cuda, agreement=0.9, tokens=4)
    assert broken.agreement == "0/2 · 0/2 · 1 of 5"


def test_on_a_gpu_answers_drifting_late_pass_and_on_cpu_they_fail():
    """bf16 kernels change with the batch shape: a late divergence is rounding, not a broken step."""
    eager = answered("generate only, batch 2", False, {"a": "5 6 7 8 9", "b": "1 2 3 4 5"})
    late = answered("generate only, batch 2, compiled", True, {"a": "5 6 7 8 0", "b": "1 2 3 4 0"})
    assert throughput.check_answers([eager, late], cuda=True, agreement=0.9, tokens=4)
    assert late.agreement == "2/2 · 0/2 · 4 of 5"
    assert not throughput.check_answers([eager, late], cuda=False, agreement=0.9, tokens=4)


def test_answers_are_compared_as_token_ids_even_where_the_tokenizer_has_no_text(tiny_model):
    """The random 8B-shaped model picks IDs past the small tokenizer's vocabulary: as text they would all be ''."""
    import torch

    from jjvmed.model import load_processor

    tokenizer = load_processor(str(tiny_model)).tokenizer
    rows = torch.tensor([[128000, 5], [3, 128319]])
    assert tokenizer.batch_decode(rows[:, :1] * 0 + 128000, skip_special_tokens=True) == ["", ""]
    ids = throughput.TokenIds(tokenizer)
    assert ids.batch_decode(rows, skip_special_tokens=True) == ["128000 5", "3 128319"]
    assert ids.pad_token_id == tokenizer.pad_token_id
