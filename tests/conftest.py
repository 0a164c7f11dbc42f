"""Shared fixtures: one tiny LLaVA and one LoRA adapter for the whole test session, and one way to run
an entry script on them.

Test data: the MIT-licensed DICOM-derived PNGs ship under tests/data/real_images; everything else
(ROCOv2 concept list, ROCO captions, MedICaT figures) is read from ../shared/data when it is there,
and the tests that need it skip with a one-line reason when it is not (a bare clone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_IMAGES = ROOT / "tests" / "data" / "real_images"
ROCOV2 = SHARED_DATA / "rocov2" / "cui_mapping.csv"
ROCO = SHARED_DATA / "roco_v1"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

needs_rocov2 = pytest.mark.skipif(not ROCOV2.exists(), reason="needs ../shared/data/rocov2 (the ROCOv2 concept list)")
needs_roco = pytest.mark.skipif(not ROCO.exists(), reason="needs ../shared/data/roco_v1 (ROCO validation captions)")


def needs_package(package: str):
    """Skip where an optional package (timm, open_clip) is not installed."""
    import importlib.util

    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"needs {package} (.ci/run installs it; README: Concepts from the vision tower)")


needs_timm, needs_open_clip = needs_package("timm"), needs_package("open_clip")

from tiny_llava import build_tiny_llava  # noqa: E402

HOLD_LOCK = """
import sys
sys.path.insert(0, sys.argv[1])
from jjvmed.files import lock_exclusive
with lock_exclusive(sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the run lock of `path` until its stdin closes (or it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ROOT), str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def fill_the_disk(fh) -> None:
    """From now on every byte written through `fh` fails as on a full disk (ENOSPC)."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fh.fileno())
    os.close(full)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_adapter(model_dir: Path, out_dir: Path, seed: int = 1, as_list: bool = True) -> Path:
    """A LoRA adapter with the published recipe's targets and random (non-zero) weights."""
    import re

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    names = [n for n, _ in model.named_modules()
             if re.fullmatch(LM_TARGETS, n) or n.endswith(("multi_modal_projector.linear_1",
                                                           "multi_modal_projector.linear_2"))]
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                        target_modules=names if as_list else LM_TARGETS + r"|.*multi_modal_projector\.linear_[12]",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapter"))


def tiny_args(tiny_model: Path, out: Path, image_dir: Path = REAL_IMAGES, *extra: str) -> list[str]:
    """The options every run on the tiny model shares: base model, no adapter, short answers."""
    return ["--image_dir", str(image_dir), "--output_csv", str(out), "--base_model_path", str(tiny_model),
            "--adapter_repo", "none", "--max_new_tokens", "8", "--num_workers", "0", *extra]


def run_in_process(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run an entry script's main() here (fast), with its exit code and stderr as a subprocess would give."""
    import contextlib
    import importlib
    import io

    from jjvmed.errors import run_cli

    module = importlib.import_module(Path(script).stem)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(module.main, list(args))
    return subprocess.CompletedProcess([script, *args], code, "", err.getvalue())


def run_script(script: str, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run an entry script in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=kwargs.get("cwd", ROOT))


def make_image_files(folder: Path, count: int) -> dict[str, str]:
    """ID -> path of `count` small files of different bytes, for code that never decodes them (journal, shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for n in range(count):
        path = folder / f"img_{n}.png"
        path.write_bytes(b"picture %d " % n * 100)
        files[path.stem] = str(path)
    return files


def read_csv(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))
