"""Best of N (generate_captions.py --candidates N --rerank_model M): every candidate kept in the journal, each
scored against its image by an image-text model, the highest kept; another reranker needs no generation.

The rerankers are tiny random image-text models built offline with the real classes (tests/tiny_encoders.py:
Hugging Face CLIP and SigLIP with both towers, open_clip's CLIP from a config), saved as their libraries save
them. The expected choice is computed here, independently, with the same classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_IMAGES, needs_open_clip, read_csv, run_in_process
from tiny_encoders import SIZE, save_hf_clip, save_hf_siglip, save_open_clip

from jjvmed.journal import read_journal, record_line
from jjvmed.prompts import clean_caption
from jjvmed.records import Record

IMAGES = 4


def hf_scores(folder: Path, image_ids: list[str], candidates: dict[str, list[str]]) -> dict[str, list[float]]:
    """Each candidate's cosine with its image, straight from the transformers classes."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    from jjvmed.images import load_image

    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    config = AutoConfig.from_pretrained(folder)
    padding = "max_length" if config.model_type == "siglip" else True
    out = {}
    with torch.no_grad():
        for i in image_ids:
            pixels = processor(images=[load_image(REAL_IMAGES / f"{i}.png")], return_tensors="pt")["pixel_values"]
            image = model.get_image_features(pixel_values=pixels).pooler_output
            texts = [clean_caption(c) for c in candidates[i]]
            tokens = tokenizer(texts, padding=padding, truncation=True,
                               max_length=config.text_config.max_position_embeddings, return_tensors="pt")
            text = model.get_text_features(**tokens).pooler_output
            out[i] = torch.nn.functional.cosine_similarity(text, image).tolist()
    return out


def best_of_n(tiny_model: Path, out: Path, *extra: str):
    ids = sorted(p.stem for p in REAL_IMAGES.glob("*.png"))[:IMAGES]
    (out.parent / "ids.csv").write_text("ID,Caption\n" + "".join(f"{i},\n" for i in ids))
    return run_in_process("generate_captions.py", "--image_dir", str(REAL_IMAGES), "--ids_csv",
                          str(out.parent / "ids.csv"), "--output_csv", str(out), "--base_model_path", str(tiny_model),
                          "--adapter_repo", "none", "--max_new_tokens", "8", "--num_workers", "0", *extra)


def journal_of(out: Path):
    return read_journal(out.with_name(f"{out.stem}.journal.jsonl"))


@pytest.mark.parametrize("save", [save_hf_clip, save_hf_siglip], ids=["clip", "siglip"])
def test_best_of_n_keeps_the_candidate_the_reranker_scores_highest(tiny_model, tmp_path, save):
    reranker = save(tmp_path / "reranker", seed=0)
    out = tmp_path / "captions.csv"
    result = best_of_n(tiny_model, out, "--candidates", "3", "--rerank_model", str(reranker))
    assert result.returncode == 0, result.stderr
    records = journal_of(out).records
    assert len(records) == IMAGES and all(len(r.candidates) == 3 for r in records.values())
    assert all(len(set(r.candidates)) == 3 for r in records.values())  # three different beams
    expected = hf_scores(reranker, list(records), {i: list(r.candidates) for i, r in records.items()})
    for i, r in records.items():
        (key, scores), = r.scores.items()
        assert np.allclose(scores, expected[i], atol=1e-5)
    rows = dict(read_csv(out)[1:])
    assert rows == {i: clean_caption(r.candidates[int(np.argmax(expected[i]))]) for i, r in records.items()}
    assert "best of 3 by hf:" in result.stderr


def test_another_reranker_scores_the_same_candidates_without_generating(tiny_model, tmp_path):
    first, second = save_hf_clip(tmp_path / "a", seed=0), save_hf_clip(tmp_path / "b", seed=1)
    out = tmp_path / "captions.csv"
    assert best_of_n(tiny_model, out, "--candidates", "3", "--rerank_model", str(first)).returncode == 0
    candidates = {i: r.candidates for i, r in journal_of(out).records.items()}
    again = best_of_n(tiny_model, out, "--candidates", "3", "--rerank_model", str(second),
                      "--resume_from_checkpoint", "auto")
    assert again.returncode == 0, again.stderr
    assert "generated now: 0" in again.stderr and f"scored now: {IMAGES}" in again.stderr
    records = journal_of(out).records
    assert {i: r.candidates for i, r in records.items()} == candidates
    assert all(len(r.scores) == 2 for r in records.values())  # both rerankers' scores kept
    expected = hf_scores(second, list(records), {i: list(c) for i, c in candidates.items()})
    assert dict(read_csv(out)[1:]) == {i: clean_caption(c[int(np.argmax(expected[i]))]) for i, c in candidates.items()}
    # and back to the first: nothing generated, nothing scored, its choice again
    back = best_of_n(tiny_model, out, "--candidates", "3", "--rerank_model", str(first), "--resume_from_checkpoint",
                     "auto")
    assert "generated now: 0" in back.stderr and "scored now: 0" in back.stderr


def test_a_reranker_that_is_no_image_text_model_is_refused_before_anything_generates(tiny_model, tmp_path):
    out = tmp_path / "c.csv"
    result = best_of_n(tiny_model, out, "--candidates", "2", "--rerank_model", str(tiny_model))  # LLaVA: no towers
    assert result.returncode == 2 and "is a llava model; best of N needs an image-text model" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.with_name("c.journal.jsonl").exists()


def test_a_reranker_folder_without_its_tokenizer_is_refused_before_anything_generates(tiny_model, tmp_path):
    """Without tokenizer files every caption became the same unknown tokens: equal scores, the first kept."""
    folder = save_hf_clip(tmp_path / "clip", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    out = tmp_path / "c.csv"
    result = best_of_n(tiny_model, out, "--candidates", "2", "--rerank_model", str(folder))
    assert result.returncode == 2 and "has no tokenizer files" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not out.with_name("c.journal.jsonl").exists()


def test_candidates_without_a_reranker_keep_the_best_beam(tiny_model, tmp_path):
    best = tmp_path / "best" / "captions.csv"
    beams = tmp_path / "beams" / "captions.csv"
    for folder in (best.parent, beams.parent):
        folder.mkdir()
    assert best_of_n(tiny_model, best, "--candidates", "3").returncode == 0
    assert best_of_n(tiny_model, beams, "--generation_kwargs", '{"num_beams": 3}').returncode == 0
    assert read_csv(best) == read_csv(beams)


@needs_open_clip
def test_an_open_clip_reranker_picks_by_its_own_towers(tiny_model, tmp_path):
    import torch

    from jjvmed.encoders import import_optional, torchvision_placeholders
    from jjvmed.images import load_image
    from jjvmed.preprocessing import from_open_clip_config

    reranker = save_open_clip(tmp_path / "oc", seed=0)
    out = tmp_path / "captions.csv"
    result = best_of_n(tiny_model, out, "--candidates", "3", "--rerank_model", f"open_clip:{reranker}")
    assert result.returncode == 0, result.stderr
    assert "by open_clip:oc@" in result.stderr, result.stderr  # the family named once
    open_clip = import_optional("open_clip")
    with torchvision_placeholders():
        model = open_clip.create_model(f"local-dir:{reranker}").eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{reranker}")
    preprocess = from_open_clip_config({}, SIZE)
    records = journal_of(out).records
    rows = dict(read_csv(out)[1:])
    for i, r in records.items():
        with torch.no_grad():
            image = model.encode_image(preprocess([load_image(REAL_IMAGES / f"{i}.png")]))
            text = model.encode_text(tokenizer([clean_caption(c) for c in r.candidates]))
        scores = torch.nn.functional.cosine_similarity(text, image).tolist()
        assert rows[i] == clean_caption(r.candidates[int(np.argmax(scores))])


def test_the_journal_keeps_candidates_and_scores_and_sets_a_damaged_one_aside(tmp_path):
    from jjvmed.journal import header_line

    good = Record("a", "first", None, ("first", "second"), {"hf:clip:x@1": (0.25, None)})
    plain = Record("b", "only")
    damaged = {"id": "c", "text": "t", "error": None, "file": [], "candidates": ["t", "u"],
               "scores": {"hf:clip:x@1": [0.5]}}  # one score for two candidates
    path = tmp_path / "c.journal.jsonl"
    path.write_bytes(header_line({"task": "caption"}, "/images") + record_line(good, []) + record_line(plain, [])
                     + (json.dumps(damaged) + "\n").encode())
    contents = read_journal(path)
    assert contents.records == {"a": good, "b": plain}
    assert len(contents.bad_lines) == 1
    assert b"candidates" not in record_line(plain, [])  # a record without candidates is written as before
