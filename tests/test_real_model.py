"""Checks on the real 8B model and the published adapter; skipped unless local copies are given.

    JJVMED_BASE_MODEL=/models/llava-llama-3-8b-v1_1-transformers \
    JJVMED_ADAPTER=/models/ja-med-clef-model python -m pytest tests/test_real_model.py

Needs a GPU with about 20 GB (or set JJVMED_4BIT=1 for about 8 GB).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, read_csv, run_in_process

BASE = os.environ.get("JJVMED_BASE_MODEL")
ADAPTER = os.environ.get("JJVMED_ADAPTER")
FOUR_BIT = ["--load_in_4bit"] if os.environ.get("JJVMED_4BIT") else []
pytestmark = pytest.mark.skipif(not (BASE and ADAPTER), reason="set JJVMED_BASE_MODEL and JJVMED_ADAPTER to local "
                                "copies of the 8B model and the adapter")


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    for name in ("REAL_DICOM_001.png", "REAL_DICOM_004.png", "REAL_DICOM_011.png"):  # chest CR, CT, ultrasound
        shutil.copy(REAL_IMAGES / name, folder / name)
    return folder


def test_the_published_adapter_really_changes_the_model():
    import torch
    from transformers import LlavaForConditionalGeneration

    from jjvmed.model import apply_adapter, input_device, resolve_adapter

    llava = LlavaForConditionalGeneration.from_pretrained(BASE, dtype=torch.bfloat16, device_map="auto")
    ids = torch.tensor([[128000, 14711, 25, 220]], device=input_device(llava))
    with torch.no_grad():
        before = llava(input_ids=ids).logits.float()
        after = apply_adapter(llava, resolve_adapter(ADAPTER, None))(input_ids=ids).logits.float()
    assert not torch.allclose(before, after, atol=1e-3)


def test_real_captions_are_english_text_that_stops_on_its_own(few_images, tmp_path):
    out = tmp_path / "captions.csv"
    argv = ["--image_dir", str(few_images), "--output_csv", str(out), "--base_model_path", BASE,
            "--adapter_repo", ADAPTER, "--max_new_tokens", "100", *FOUR_BIT]
    result = run_in_process("generate_captions.py", *argv)
    assert result.returncode == 0, result.stderr
    captions = [c for _, c in read_csv(out)[1:]]
    assert len(captions) == 3 and all(len(c.split()) >= 3 for c in captions)
    assert all(sum(ch.isascii() for ch in c) / len(c) > 0.95 for c in captions)
    assert any(len(c.split()) < 60 for c in captions)  # eot ends an answer before max_new_tokens


def test_real_concepts_map_to_cuis(few_images, tmp_path):
    argv = ["--image_dir", str(few_images), "--output_csv", str(tmp_path / "c.csv"), "--output_csv_natural",
            str(tmp_path / "n.csv"), "--base_model_path", BASE, "--adapter_repo", ADAPTER, *FOUR_BIT]
    result = run_in_process("generate_concepts.py", *argv)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "c.csv")[1:]
    assert sum(1 for _, cuis in rows if cuis) >= 2
