"""Captions from the nearest training images (generate_captions.py --method knn | rag) and their tuning.

Synthetic images whose caption is what they show: a filled circle of one of six colours on a dark ground,
two training pictures per colour, all captioned "Plain x-ray of a <colour> circle."; the held-out images are
new drawings of the same six (another position, radius, shade and ground). The tiny LLaVA's random vision
tower (and a tiny random CLIP vision tower) still separates the colours, so the nearest training image of a
held-out one is of its colour, and carries its caption.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_IMAGES, ROOT, read_csv, run_in_process

import concept_index
from jjvmed import errors
from jjvmed.files import write_csv_atomic

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 220, 40),
           "magenta": (210, 50, 200), "cyan": (40, 200, 210)}


def caption_of(colour: str) -> str:
    return f"Plain x-ray of a {colour} circle."


def draw(rng: np.random.Generator, colour: str, size: int = 112):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (int(rng.integers(0, 30)),) * 3)
    r = 34 + int(rng.integers(-3, 4))
    cx, cy = (size // 2 + int(x) for x in rng.integers(-4, 5, 2))
    fill = tuple(int(v + rng.integers(-10, 10)) for v in COLOURS[colour])
    ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return img


def make_split(folder: Path, per_colour: int, seed: int) -> dict[str, str]:
    """`per_colour` drawings of every colour; ID -> caption."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    captions = {}
    for colour in COLOURS:
        for n in range(per_colour):
            image_id = f"{folder.name}_{colour}_{n}"
            draw(rng, colour).save(folder / f"{image_id}.png")
            captions[image_id] = caption_of(colour)
    return captions


def index_cli(*argv: str) -> int:
    return errors.run_cli(concept_index.main, list(argv))


def captions_run(*argv: str):
    return run_in_process("generate_captions.py", *argv)


@pytest.fixture(scope="module")
def data(tiny_model, tmp_path_factory) -> Path:
    """Training and held-out images, their captions, the training embeddings of the tiny LLaVA's tower, and
    a caption index fitted on them (and one fitted with concepts only)."""
    root = tmp_path_factory.mktemp("captions")
    train = make_split(root / "train", 2, seed=0)
    held_out = make_split(root / "held_out", 1, seed=1)
    write_csv_atomic(root / "train_captions.csv", ["ID", "Caption"], train.items())
    write_csv_atomic(root / "held_out_captions.csv", ["ID", "Caption"], held_out.items())
    write_csv_atomic(root / "train_concepts.csv", ["ID", "CUIs"], ([i, "C0040405"] for i in train))
    assert index_cli("embed", "--image_dir", str(root / "train"), "--embeddings", str(root / "train.npz"),
                     "--base_model_path", str(tiny_model), "--num_workers", "0") == 0
    assert index_cli("fit", "--embeddings", str(root / "train.npz"), "--train_captions",
                     str(root / "train_captions.csv"), "--concept_index", str(root / "index")) == 0
    assert index_cli("fit", "--embeddings", str(root / "train.npz"), "--train_concepts",
                     str(root / "train_concepts.csv"), "--concept_index", str(root / "concepts_only"),
                     "--probe_epochs", "0") == 0
    return root


def tiny(tiny_model: Path) -> list[str]:
    return ["--base_model_path", str(tiny_model), "--num_workers", "0"]


def generating(tiny_model: Path) -> list[str]:
    return [*tiny(tiny_model), "--adapter_repo", "none", "--max_new_tokens", "6"]


def test_knn_captions_are_the_captions_of_the_held_out_images_in_the_id_lists_order(data, tiny_model, tmp_path):
    expected = dict(read_csv(data / "held_out_captions.csv")[1:])
    order = list(reversed(expected))  # the platform's order, not the folder's
    write_csv_atomic(tmp_path / "ids.csv", ["ID", "Caption"], ([i, ""] for i in order))
    out = tmp_path / "knn.csv"
    result = captions_run("--method", "knn", "--concept_index", str(data / "index"), "--image_dir",
                          str(data / "held_out"), "--output_csv", str(out), "--ids_csv", str(tmp_path / "ids.csv"),
                          "--zip", str(tmp_path / "knn.zip"), *tiny(tiny_model))
    assert result.returncode == 0, result.stderr
    assert read_csv(out) == [["ID", "Caption"], *([i, expected[i]] for i in order)]
    assert "the official checks say accepted" in result.stderr and (tmp_path / "knn.zip").exists()
    assert "retrieved: 6" in result.stderr and (tmp_path / "knn.embeddings.npz").exists()
    # the encoder's loading is not counted as retrieving
    loading = re.search(r"time: [\d.]+ s \(([\d.]+) s loading[,)]", result.stderr)
    assert loading and float(loading.group(1)) > 0, result.stderr


def test_a_changed_image_is_embedded_again_and_captioned_from_its_new_picture(data, tiny_model, tmp_path, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(data / "held_out", images)
    out = tmp_path / "knn.csv"
    run = ["--method", "knn", "--concept_index", str(data / "index"), "--image_dir", str(images), "--output_csv",
           str(out), *tiny(tiny_model)]
    assert captions_run(*run).returncode == 0
    assert dict(read_csv(out)[1:])["held_out_red_0"] == caption_of("red")
    shutil.copy(images / "held_out_blue_0.png", images / "held_out_red_0.png")  # another picture, the same ID
    again = captions_run(*run)
    assert again.returncode == 0, again.stderr
    assert dict(read_csv(out)[1:])["held_out_red_0"] == caption_of("blue")
    assert "5 images reused, 1 embedded (1 changed since)" in again.stderr

    def no_model(*args, **kwargs):
        raise AssertionError("every image is unchanged: nothing to embed")

    monkeypatch.setattr("jjvmed.embeddings.load_encoder", no_model)
    third = captions_run(*run)
    assert third.returncode == 0, third.stderr
    assert "6 images reused, 0 embedded" in third.stderr and dict(read_csv(out)[1:])["held_out_red_0"] == \
        caption_of("blue")


def test_knn_under_a_launcher_is_refused_in_one_line_before_anything_loads(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = captions_run("--method", "knn", "--concept_index", str(data / "index"), "--image_dir",
                          str(data / "held_out"), "--output_csv", str(tmp_path / "knn.csv"), "--base_model_path",
                          "/no/such/model")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "one process" in result.stderr and list(tmp_path.iterdir()) == []


def test_knn_with_another_image_encoder_is_one_option_away(data, tiny_model, tmp_path):
    """The same path with a tiny random CLIP vision tower instead of LLaVA's (BiomedCLIP or MedSigLIP for real)."""
    from tiny_encoders import save_hf_clip_vision

    spec = f"hf:{save_hf_clip_vision(tmp_path / 'clip')}"
    assert index_cli("embed", "--image_dir", str(data / "train"), "--embeddings", str(tmp_path / "train.npz"),
                     "--encoder", spec, "--num_workers", "0") == 0
    assert index_cli("fit", "--embeddings", str(tmp_path / "train.npz"), "--train_captions",
                     str(data / "train_captions.csv"), "--concept_index", str(tmp_path / "index")) == 0
    out = tmp_path / "knn.csv"
    result = captions_run("--method", "knn", "--concept_index", str(tmp_path / "index"), "--image_dir",
                          str(data / "held_out"), "--output_csv", str(out), *tiny(tiny_model))
    assert result.returncode == 0, result.stderr
    assert dict(read_csv(out)[1:]) == dict(read_csv(data / "held_out_captions.csv")[1:])


def test_knn_from_an_embeddings_file_needs_no_image_folder_and_no_model(data, tiny_model, tmp_path):
    emb = tmp_path / "held_out.npz"
    assert index_cli("embed", "--image_dir", str(data / "held_out"), "--embeddings", str(emb),
                     "--base_model_path", str(tiny_model), "--num_workers", "0") == 0
    out = tmp_path / "knn.csv"
    # no --image_dir, and a base model that does not exist: nothing is loaded
    result = captions_run("--method", "knn", "--concept_index", str(data / "index"), "--embeddings", str(emb),
                          "--output_csv", str(out), "--base_model_path", "/no/such/model", "--limit", "3")
    assert result.returncode == 0, result.stderr
    expected = dict(read_csv(data / "held_out_captions.csv")[1:])
    rows = read_csv(out)[1:]
    assert [i for i, _ in rows] == sorted(expected)[:3] and all(expected[i] == c for i, c in rows)


def test_knn_with_more_neighbours_keeps_the_caption_the_others_agree_with():
    from jjvmed.retrieval import consensus

    assert consensus(["CT of the chest.", "MRI of the brain.", "MRI of the brain with contrast."]) \
        == "MRI of the brain."
    assert consensus(["Plain x-ray.", "CT scan."]) == "Plain x-ray."  # no agreement: the nearest
    assert consensus(["Only one."]) == "Only one."


def decoded_prompts(monkeypatch) -> list[str]:
    """The prompts the model is given, decoded from each batch's input IDs (image tokens collapsed to one
    <image>, padding and the begin-of-text token dropped)."""
    from jjvmed import generation

    seen: list[str] = []
    real = generation.generate_batches

    def recording(model, processor, batches, *args, **kwargs):
        def through(batches):
            for batch in batches:
                for ids in batch.inputs["input_ids"]:
                    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
                    text = re.sub(r"(<image>)+", "<image>", text.replace("<pad>", "").replace("<|begin_of_text|>", ""))
                    seen.append(text)
                yield batch
        return real(model, processor, through(batches), *args, **kwargs)

    monkeypatch.setattr(generation, "generate_batches", recording)
    return seen


def nearest_training_captions(data: Path, run_embeddings: Path, k: int) -> dict[str, list[str]]:
    """The k nearest training captions of every image, computed here with numpy from the two embeddings files."""
    from jjvmed.embeddings import load_embeddings

    train, run = load_embeddings(data / "train.npz"), load_embeddings(run_embeddings)
    captions = dict(read_csv(data / "train_captions.csv")[1:])
    sims = run.vectors[0] @ train.vectors[0].T
    return {i: [captions[train.ids[j]] for j in np.argsort(-sims[n], kind="stable")[:k]]
            for n, i in enumerate(run.ids)}


def test_rag_puts_the_nearest_training_captions_into_the_prompt_as_the_template_says(data, tiny_model, tmp_path,
                                                                                      monkeypatch):
    prompts = decoded_prompts(monkeypatch)
    out = tmp_path / "rag.csv"
    result = captions_run("--method", "rag", "--concept_index", str(data / "index"), "--neighbours", "3",
                          "--image_dir", str(data / "held_out"), "--output_csv", str(out), "--prompt_template",
                          "vicuna", "--batch_size", "2", *generating(tiny_model))
    assert result.returncode == 0, result.stderr
    nearest = nearest_training_captions(data, tmp_path / "rag.embeddings.npz", 3)
    expected = ["USER: <image>\nPies de foto de imágenes médicas parecidas a esta (describen otras imágenes, no "
                "esta):\n" + "".join(f"- {c}\n" for c in nearest[i]) +
                "¿Cuál es la descripción o el pie de foto de esta imagen médica?\nASSISTANT:" for i in nearest]
    assert prompts == expected
    assert nearest["held_out_red_0"][0] == caption_of("red")
    assert len(read_csv(out)) == 7
    header = json.loads((tmp_path / "rag.journal.jsonl").read_text().splitlines()[0])
    assert header["settings"]["retrieval"]["neighbours"] == 3
    assert "{context}" in header["settings"]["prompt"]  # the template, not one image's prompt


def test_a_rag_resume_with_another_index_or_neighbours_is_refused(data, tiny_model, tmp_path, capsys):
    out = tmp_path / "rag.csv"
    run = ["--method", "rag", "--image_dir", str(data / "held_out"), "--output_csv", str(out), "--limit", "2",
           *generating(tiny_model)]
    assert captions_run(*run, "--concept_index", str(data / "index")).returncode == 0
    fitted_again = tmp_path / "index"
    (data / "train_captions_v2.csv").write_text(
        (data / "train_captions.csv").read_text().replace("Plain x-ray", "Radiograph"))
    assert index_cli("fit", "--embeddings", str(data / "train.npz"), "--train_captions",
                     str(data / "train_captions_v2.csv"), "--concept_index", str(fitted_again)) == 0
    for other in (["--concept_index", str(fitted_again)],
                  ["--concept_index", str(data / "index"), "--neighbours", "2"]):
        result = captions_run(*run, *other, "--resume_from_checkpoint", "auto")
        assert result.returncode == 2 and "other settings" in result.stderr and "retrieval" in result.stderr


def test_a_rag_run_after_a_limit_trial_embeds_only_the_images_the_trial_left_out(data, tiny_model, tmp_path):
    out = tmp_path / "rag.csv"
    run = ["--method", "rag", "--concept_index", str(data / "index"), "--image_dir", str(data / "held_out"),
           "--output_csv", str(out), *generating(tiny_model)]
    assert captions_run(*run, "--limit", "2").returncode == 0
    full = captions_run(*run, "--resume_from_checkpoint", "auto")
    assert full.returncode == 0, full.stderr
    assert "generated now: 4, done before: 2" in full.stderr and "2 images reused, 4 embedded" in full.stderr
    assert len(read_csv(out)) == 7


def test_embeddings_of_other_encoder_settings_are_refused_before_the_model_loads(data, tiny_model, tmp_path,
                                                                                monkeypatch):
    emb = tmp_path / "held_out_cls.npz"  # the index's images were pooled by the mean, these by the CLS token
    assert index_cli("embed", "--image_dir", str(data / "held_out"), "--embeddings", str(emb), "--pooling", "cls",
                     *tiny(tiny_model)) == 0

    def no_model(*args, **kwargs):
        raise AssertionError("refused before any model loads")

    monkeypatch.setattr("jjvmed.sources.load_model", no_model)
    result = captions_run("--method", "rag", "--concept_index", str(data / "index"), "--image_dir",
                          str(data / "held_out"), "--output_csv", str(tmp_path / "rag.csv"), "--embeddings", str(emb),
                          *generating(tiny_model))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cls" in result.stderr and "--overwrite" in result.stderr
    assert not (tmp_path / "rag.csv").exists() and not (tmp_path / "rag.journal.jsonl").exists()


def journal_records(path: Path) -> int:
    return max(0, path.read_bytes().count(b"\n") - 1) if path.exists() else 0


def test_rag_resumes_after_sigkill_to_the_same_bytes(data, tiny_model, tmp_path):
    images = sorted(REAL_IMAGES.glob("*.png"))
    args = ["--method", "rag", "--concept_index", str(data / "index"), "--neighbours", "2", "--image_dir",
            str(REAL_IMAGES), "--base_model_path", str(tiny_model), "--adapter_repo", "none", "--max_new_tokens", "48",
            "--batch_size", "1", "--num_workers", "1"]  # one decoding worker: the model then runs on one thread
    full = tmp_path / "full" / "captions.csv"
    done = subprocess.run([sys.executable, str(ROOT / "generate_captions.py"), *args, "--output_csv", str(full)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed" / "captions.csv"
    journal = out.with_name("captions.journal.jsonl")
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate_captions.py"), *args, "--output_csv", str(out)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while journal_records(journal) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = journal_records(journal)
    assert 5 <= killed_at < len(images), "the run should have been killed half-way"

    resumed = subprocess.run([sys.executable, str(ROOT / "generate_captions.py"), *args, "--output_csv", str(out),
                              "--resume_from_checkpoint", "auto"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"generated now: {len(images) - killed_at}" in resumed.stderr
    assert out.read_bytes() == full.read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--method", "rag", "--concept_index", "{data}/concepts_only"], "has no captions"),
    (["--method", "knn", "--concept_index", "{data}/concepts_only"], "has no captions"),
    (["--candidates", "0"], "--candidates must be at least 1"),
    (["--method", "rag", "--concept_index", "{data}/index", "--neighbours", "0"], "--neighbours must be at least 1"),
    (["--candidates", "3", "--rerank_model", "/no/such/reranker"], "/no/such/reranker: no such folder"),
    (["--candidates", "3", "--rerank_model", "{data}/train"], "has no config.json"),
    (["--rerank_model", "{data}/index"], "add --candidates N"),
    (["--method", "knn", "--concept_index", "{data}/index", "--candidates", "3"], "--candidates: only for generated"),
    (["--method", "knn", "--concept_index", "{data}/index", "--max_new_tokens", "9"], "--max_new_tokens: only for"),
    (["--concept_index", "{data}/index"], "--concept_index: only with --method knn or rag"),
    (["--method", "rag"], "--method rag needs --concept_index"),
    (["--method", "rag", "--concept_index", "{data}/index", "--prompt", "Describe it."], "put {context} in it"),
    (["--method", "rag", "--concept_index", "{data}/index", "--num_shards", "2", "--shard_index", "0"],
     "embed the images once first"),
    (["--candidates", "4", "--generation_kwargs", '{"do_sample": true, "num_beams": 2}'], "num_return_sequences"),
    (["--generation_kwargs", '{"num_beams": 0}'], "num_beams must be at least 1"),
    (["--generation_kwargs", '{"temperature": 0.5}'], "temperature"),
])
def test_bad_caption_method_options_are_one_line_before_any_model_loads(data, tmp_path, argv, message):
    out = tmp_path / "c.csv"
    argv = [a.replace("{data}", str(data)) for a in argv]
    # the base model does not exist: had anything tried to load it, that would be the error
    result = captions_run("--image_dir", str(data / "held_out"), "--output_csv", str(out), "--base_model_path",
                          "/no/such/model", *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_tune_captions_compares_knn_and_rag_runs_and_names_the_parts_that_ran(data, tiny_model, tmp_path, capsys):
    run = tmp_path / "rag.csv"
    assert captions_run("--method", "rag", "--concept_index", str(data / "index"), "--neighbours", "2",
                        "--image_dir", str(data / "held_out"), "--output_csv", str(run),
                        *generating(tiny_model)).returncode == 0
    assert index_cli("tune_captions", "--concept_index", str(data / "index"), "--embeddings",
                     str(tmp_path / "rag.embeddings.npz"), "--valid_captions", str(data / "held_out_captions.csv"),
                     "--journals", str(tmp_path / "rag.journal.jsonl")) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[1].startswith("knn, 1 neighbour ") and table[1].split()[-1] == "1.0000"  # best first
    assert any(line.startswith("rag, 2 neighbours (rag.journal.jsonl)") for line in table)
    assert "ROUGE-1" in table[0] and "BLEU-1" in table[0] and "BERTScore" not in table[0]
    assert "scored on 6 validation images" in captured.err and "skipped BERTScore, MedImageInsight, BLEURT" \
        in captured.err and "best: knn, 1 neighbour: --method knn --neighbours 1" in captured.err


def test_an_index_keeps_captions_with_commas_quotes_and_accents_and_concept_tuning_refuses_one_without_concepts(
        data, tmp_path, capsys):
    from jjvmed.index import load_index

    tricky = {i: f'Ecografía, "corte" {n}: {"x" * (3000 if n == 0 else n)}' for n, i in
              enumerate(dict(read_csv(data / "train_captions.csv")[1:]))}
    write_csv_atomic(tmp_path / "captions.csv", ["ID", "Caption"], tricky.items())
    assert index_cli("fit", "--embeddings", str(data / "train.npz"), "--train_captions", str(tmp_path / "captions.csv"),
                     "--concept_index", str(tmp_path / "index")) == 0
    index = load_index(tmp_path / "index")
    assert dict(zip(index.ids, index.captions, strict=True)) == tricky and index.cuis == []
    # a long caption does not make every caption take its width on disk
    assert (tmp_path / "index" / "index.npz").stat().st_size < 100_000
    assert load_index(data / "concepts_only").captions is None
    capsys.readouterr()
    assert index_cli("tune", "--concept_index", str(tmp_path / "index"), "--embeddings", str(data / "train.npz"),
                     "--valid_concepts", str(data / "train_concepts.csv"), "--concept_settings",
                     str(tmp_path / "s.json")) == 2
    assert "has no concepts" in capsys.readouterr().err
