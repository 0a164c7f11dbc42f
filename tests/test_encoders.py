"""Any image encoder through `concept_index.py embed --encoder SPEC`, and ensembles of them.

Every encoder here is a tiny random model of its family (tests/tiny_encoders.py), saved to a folder the way
its library saves one, then loaded by the same code a real checkpoint goes through.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_open_clip, needs_package, needs_timm, read_csv
from tiny_encoders import ENCODERS, SIZE, save_hf_clip, save_hf_clip_vision, save_hf_dinov2

import concept_index
from jjvmed import errors
from jjvmed.embeddings import Embeddings, load_embeddings, save_embeddings


def cli(*argv: str) -> int:
    return errors.run_cli(concept_index.main, list(argv))


def draw_images(folder: Path) -> list[str]:
    """Six small images of different colours and sizes, and a copy of the first under another ID."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for n, (colour, size) in enumerate([((220, 40, 40), (64, 48)), ((40, 180, 60), (48, 64)), ((50, 70, 220), (50, 50)),
                                        ((230, 230, 40), (80, 40)), ((20, 20, 20), (36, 36)),
                                        ((200, 200, 200), (40, 90))]):
        img = Image.new("RGB", size, colour)
        ImageDraw.Draw(img).ellipse([4, 4, size[0] // 2, size[1] // 2], fill=(255 - colour[0], 128, colour[2]))
        img.save(folder / f"img_{n + 1}.png")
        ids.append(f"img_{n + 1}")
    (folder / "img_copy.png").write_bytes((folder / "img_1.png").read_bytes())
    return ids + ["img_copy"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    draw_images(folder)
    return folder


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    """The tiny encoders, each saved once for the module (those whose package is installed)."""
    import importlib.util

    root = tmp_path_factory.mktemp("encoders")
    return {name: build(root / name) for name, build in ENCODERS.items()
            if importlib.util.find_spec(name.split("-")[0].replace("hf", "transformers"))}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_package(n.split("-")[0]) if n[:2] != "hf" else ())
                                  for n in ENCODERS])
def test_each_encoder_family_embeds_through_the_cli_into_a_file_that_names_it(name, specs, images, tmp_path):
    out = tmp_path / "emb.npz"
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", specs[name]) == 0
    emb = load_embeddings(out)
    assert emb.ids == ["img_1", "img_2", "img_3", "img_4", "img_5", "img_6", "img_copy"] and not emb.failed
    vectors = emb.vectors[0]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[-1], atol=1e-6)  # the same picture, the same vector
    assert len({tuple(np.round(v, 4)) for v in vectors[:6]}) == 6  # different pictures, different vectors
    made = emb.encoders[0]
    assert made["family"] == name.split("-")[0] and made["source"] == specs[name]
    assert made["dim"] == vectors.shape[1] and made["weights"]
    # the size the model takes: ours, or the one in the timm test model's own config
    assert made["image_size"] == ([160, 160] if name.startswith("timm") else [SIZE, SIZE])


@needs_timm
def test_gem_and_mean_pooling_of_a_cnn_give_other_vectors_recorded_as_such(specs, images, tmp_path):
    runs = {}
    for pooling in ("default", "gem", "mean"):
        out = tmp_path / f"{pooling}.npz"
        assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder",
                   specs["timm-convnext"], "--pooling", pooling) == 0
        runs[pooling] = load_embeddings(out)
        assert runs[pooling].encoders[0]["pooling"] == pooling
    assert not np.allclose(runs["gem"].vectors[0], runs["mean"].vectors[0])


@needs_open_clip
def test_a_pooling_the_family_lacks_is_one_line(specs, images, tmp_path, capsys):
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(tmp_path / "e.npz"), "--encoder",
               specs["open_clip-vit"], "--pooling", "gem") == 2
    err = capsys.readouterr().err
    assert "--pooling gem does not apply to open_clip encoders" in err and len(err.strip().splitlines()) == 1


def test_an_embed_that_fails_at_start_leaves_nothing_and_the_corrected_command_runs(specs, images, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder",
               f"hf:{tmp_path / 'no-such-model'}") == 2
    err = capsys.readouterr().err
    assert "--encoder hf:" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("emb.npz*"))  # no file, no <file>.parts
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", specs["hf-clip"]) == 0


def test_a_hub_model_that_is_not_in_the_cache_offline_is_one_line(images, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(tmp_path / "e.npz"), "--encoder",
               "open_clip:nobody/no-such-model") == 2
    err = capsys.readouterr().err
    assert "download the model once where there is network" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_missing_optional_package_is_named_in_one_line(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(tmp_path / "e.npz"), "--encoder",
               "timm:convnextv2_base") == 2
    err = capsys.readouterr().err
    assert "need the package timm" in err and len(err.strip().splitlines()) == 1


def test_the_old_option_spellings_still_work_with_a_deprecation_line(specs, images, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    assert cli("embed", "--image_dir", str(images), "--output", str(out), "--encoder", specs["hf-dinov2"]) == 0
    assert "--output is deprecated" in capsys.readouterr().err and out.exists()


@needs_timm
def test_embeddings_resume_after_a_stop_to_the_same_vectors(specs, images, tmp_path, capsys):
    """Two encoders into one file, in chunks of 2 images: the second encoder's run is cut short (its chunk files
    removed, as a kill before they were written leaves them); the same command again redoes only those."""
    flags = ["--image_dir", str(images), "--encoder", specs["timm-convnext"], "--encoder", specs["hf-clip"],
             "--chunk_size", "2", "--batch_size", "2"]
    full = tmp_path / "full.npz"
    assert cli("embed", "--embeddings", str(full), *flags) == 0
    out = tmp_path / "cut.npz"
    # a finished first encoder and one chunk of the second, as a run killed there leaves them
    parts = out.with_name("cut.npz.parts")
    parts.mkdir()
    from jjvmed.embeddings import EmbedOptions
    from jjvmed.embeddings import save_embeddings as save

    keys = EmbedOptions(encoders=(specs["timm-convnext"], specs["hf-clip"])).made_with()
    done = load_embeddings(full)
    for n, (m, rows) in enumerate([(0, slice(0, 4)), (0, slice(4, None)), (1, slice(0, 2))]):
        save(parts / f"chunk-{n:06d}.npz", Embeddings(done.ids[rows], [done.vectors[m][rows]], [done.encoders[m]],
                                                      meta={"made_with": [keys[m]]}, identities=done.identities))
    capsys.readouterr()
    assert cli("embed", "--embeddings", str(out), *flags) == 0
    err = capsys.readouterr().err
    assert "encoder 2/2" in err and "encoder 1/2" not in err and "2 images reused, 5 embedded" in err
    got = load_embeddings(out)
    assert got.ids == done.ids
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(got.vectors, done.vectors, strict=True))
    assert not parts.exists()


# ---------------------------------------------------------------------------------------------
# Ensembles: several encoders' files of the same images
# ---------------------------------------------------------------------------------------------

COLOURS, SHAPES = ("C0000001", "C0000002", "C0000003"), ("C0000011", "C0000012", "C0000013")


def encoder_made(name: str) -> dict:
    return {"family": "timm", "name": name, "source": f"timm:/models/{name}", "pooling": "default",
            "weights": f"{name}-weights", "image_size": [224, 224]}


def synthetic_split(folder: Path, split: str, n: int, seed: int) -> dict[str, list[str]]:
    """Images with one colour and one shape CUI; encoder 'sees-colour' places them by colour only (its other
    dimensions are noise), 'sees-shape' by shape only. Writes one embeddings file per encoder."""
    rng = np.random.default_rng(seed)
    ids = [f"{split}_{i + 1}" for i in range(n)]
    colour, shape = rng.integers(0, 3, n), rng.integers(0, 3, n)
    concepts = {i: [COLOURS[c], SHAPES[s]] for i, c, s in zip(ids, colour, shape, strict=True)}
    for name, signal in (("sees-colour", colour), ("sees-shape", shape)):
        vectors = np.eye(3, 16, dtype=np.float32)[signal] * 2 + rng.normal(0, 1, (n, 16)).astype(np.float32) * 0.3
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        save_embeddings(folder / f"{split}_{name}.npz", Embeddings(ids, [vectors], [encoder_made(name)]))
    from jjvmed.files import write_csv_atomic

    write_csv_atomic(folder / f"{split}_concepts.csv", ["ID", "CUIs"], ([i, ";".join(c)] for i, c in concepts.items()))
    return concepts


def official_f1(gt_csv: Path, pred_csv: Path) -> float:
    from jjvmed import submission
    from jjvmed.scores import concept_scores

    gt = submission.concept_pairs(submission.read_rows(gt_csv))
    pred = submission.concept_pairs(submission.read_rows(pred_csv))
    return concept_scores(gt, pred)[0]["f1"]


@pytest.fixture(scope="module")
def ensemble_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ensemble")
    for seed, (split, n) in enumerate((("train", 150), ("valid", 90), ("test", 90))):
        synthetic_split(root, split, n, seed)
    return root


def fit_tune_predict(root: Path, encoders: list[str], name: str, capsys) -> float:
    files = {split: [str(root / f"{split}_{e}.npz") for e in encoders] for split in ("train", "valid", "test")}
    index, settings, out = root / f"index_{name}", root / f"settings_{name}.json", root / f"test_{name}.csv"
    assert cli("fit", "--embeddings", *files["train"], "--train_concepts", str(root / "train_concepts.csv"),
               "--concept_index", str(index), "--probe_epochs", "5") == 0
    capsys.readouterr()
    assert cli("tune", "--concept_index", str(index), "--embeddings", *files["valid"], "--valid_concepts",
               str(root / "valid_concepts.csv"), "--concept_settings", str(settings)) == 0
    table = capsys.readouterr().out
    if len(encoders) > 1:  # each encoder alone and the ensemble, in the printed table
        assert all(f"knn [timm:{e}]" in table for e in encoders) and "ensemble" in table
    assert cli("predict", "--concept_index", str(index), "--concept_settings", str(settings), "--embeddings",
               *files["test"], "--output_csv", str(out)) == 0
    return official_f1(root / "test_concepts.csv", out)


def test_an_ensemble_whose_second_encoder_sees_what_the_first_misses_beats_both_alone(ensemble_data, capsys):
    colour = fit_tune_predict(ensemble_data, ["sees-colour"], "colour", capsys)
    shape = fit_tune_predict(ensemble_data, ["sees-shape"], "shape", capsys)
    both = fit_tune_predict(ensemble_data, ["sees-colour", "sees-shape"], "both", capsys)
    assert both >= 0.9 and both > max(colour, shape) + 0.2, (colour, shape, both)
    rows = read_csv(ensemble_data / "test_both.csv")
    assert rows[0] == ["ID", "CUIs"] and len(rows) == 91


def test_embeddings_of_another_encoder_are_refused_in_one_line_before_any_work(ensemble_data, tmp_path, capsys):
    root = ensemble_data
    assert cli("fit", "--embeddings", str(root / "train_sees-colour.npz"), "--train_concepts",
               str(root / "train_concepts.csv"), "--concept_index", str(tmp_path / "index"), "--probe_epochs", "0") == 0
    capsys.readouterr()
    # same dimensions, other encoder: tune refuses it, naming both
    assert cli("tune", "--concept_index", str(tmp_path / "index"), "--embeddings",
               str(root / "valid_sees-shape.npz"), "--valid_concepts", str(root / "valid_concepts.csv"),
               "--concept_settings", str(tmp_path / "s.json")) == 2
    err = capsys.readouterr().err
    assert "timm:sees-colour" in err and "timm:sees-shape" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()


def test_files_of_different_images_or_the_same_encoder_twice_are_refused_before_any_work(ensemble_data, tmp_path,
                                                                                        capsys):
    root = ensemble_data
    cases = {"hold different images": [str(root / "train_sees-colour.npz"), str(root / "valid_sees-shape.npz")],
             "given twice": [str(root / "train_sees-colour.npz"), str(root / "train_sees-colour.npz")]}
    for expected, files in cases.items():
        assert cli("fit", "--embeddings", *files, "--train_concepts", str(root / "train_concepts.csv"),
                   "--concept_index", str(tmp_path / "index")) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "index").exists()


def fit_ensemble_index(specs: dict[str, str], images: Path, folder: Path, probe_epochs: int) -> Path:
    """train.npz (the tiny CLIP and DINOv2 vectors of `images`), index/ fit on it and settings.json tuned on it,
    all in `folder`; returns train.npz."""
    train = folder / "train.npz"
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(train), "--encoder", specs["hf-clip"],
               "--encoder", specs["hf-dinov2"], "--num_workers", "0") == 0
    concepts = folder / "concepts.csv"
    concepts.write_text("ID,CUIs\n" + "".join(f"img_{n},C000000{n % 3}\n" for n in range(1, 7)) + "img_copy,C0000001\n")
    assert cli("fit", "--embeddings", str(train), "--train_concepts", str(concepts), "--concept_index",
               str(folder / "index"), "--probe_epochs", str(probe_epochs)) == 0
    assert cli("tune", "--concept_index", str(folder / "index"), "--embeddings", str(train), "--valid_concepts",
               str(concepts), "--concept_settings", str(folder / "settings.json")) == 0
    return train


def test_a_run_embeds_with_every_encoder_its_settings_use_and_predicts_from_that_one_file(specs, images, tmp_path,
                                                                                          capsys):
    """What generate_concepts.py does with an ensemble index: index.embed_options_for gives the encoders, one
    ensure_embeddings call writes one file with each encoder's vectors, predict_concepts reads it."""
    from jjvmed.embeddings import ensure_embeddings
    from jjvmed.fusion import load_settings, predict_concepts
    from jjvmed.images import list_images
    from jjvmed.index import embed_options_for, load_index

    train = fit_ensemble_index(specs, images, tmp_path, probe_epochs=2)
    index = load_index(tmp_path / "index")
    settings = load_settings(tmp_path / "settings.json", "fused", index)
    options = embed_options_for(index, settings, num_workers=0)
    used = [m.encoder["source"] for m, part in zip(index.members, settings["members"], strict=True)
            if part["knn"] or part["probe"]]
    assert [spec for spec, _ in options.choices()] == used and used
    emb = ensure_embeddings(list_images(images), tmp_path / "run.embeddings.npz", options).embeddings
    assert [e["source"] for e in emb.encoders] == used
    predictions = predict_concepts(index, settings, emb)
    assert sorted(predictions) == sorted(load_embeddings(train).ids)
    assert predictions["img_copy"] == predictions["img_1"]


# ---------------------------------------------------------------------------------------------
# LLaVA's tower beside the other families
# ---------------------------------------------------------------------------------------------


@needs_open_clip
def test_an_open_clip_encoder_loaded_first_leaves_the_llava_and_hf_encoders_working(specs, images, tiny_model,
                                                                                   tmp_path):
    """open_clip imports transformers; where torchvision is missing, transformers must not remember the stand-in
    as an installed torchvision, or every image processor after it fails to import. A fresh interpreter, as a
    user runs it: open_clip first, then LLaVA's tower and a Hugging Face CLIP."""
    from conftest import run_script

    out = tmp_path / "emb.npz"
    done = run_script("concept_index.py", "embed", "--image_dir", str(images), "--embeddings", str(out),
                      "--encoder", specs["open_clip-vit"], "--encoder", "llava", "--encoder", specs["hf-clip"],
                      "--base_model_path", str(tiny_model), "--num_workers", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e["family"] for e in load_embeddings(out).encoders] == ["open_clip", "llava", "hf"]


def llava_tower(model_dir: Path, dtype: str = "float32"):
    import torch

    from jjvmed.encoders import vision_encoder_from
    from jjvmed.model import load_base_model, load_processor

    model = load_base_model(str(model_dir), {"": "cpu"}, getattr(torch, dtype), load_in_4bit=False)
    return vision_encoder_from(model, load_processor(str(model_dir)))


def test_the_llava_tower_records_its_weights_the_same_in_bf16_and_fp32_and_its_image_size(tiny_model):
    """An index embedded in bf16 on a GPU must accept queries embedded in fp32 on a CPU."""
    fp32, bf16 = llava_tower(tiny_model).describe(), llava_tower(tiny_model, "bfloat16").describe()
    assert fp32["weights"] and fp32["weights"] == bf16["weights"] and fp32["dtype"] != bf16["dtype"]
    assert fp32["image_size"] == [336, 336]


def test_vectors_of_another_llava_checkpoint_of_the_same_shape_are_refused(images, tiny_model, tmp_path, capsys):
    from tiny_llava import build_tiny_llava

    other = build_tiny_llava(tmp_path / "other-llava", seed=1)  # same shapes, other weights
    for name, model in (("train", tiny_model), ("other", other)):
        assert cli("embed", "--image_dir", str(images), "--embeddings", str(tmp_path / f"{name}.npz"),
                   "--base_model_path", str(model), "--num_workers", "0") == 0
    concepts = tmp_path / "concepts.csv"
    concepts.write_text("ID,CUIs\n" + "".join(f"img_{n},C000000{n % 3}\n" for n in range(1, 7)) + "img_copy,C0000001\n")
    index, settings = tmp_path / "index", tmp_path / "settings.json"
    assert cli("fit", "--embeddings", str(tmp_path / "train.npz"), "--train_concepts", str(concepts),
               "--concept_index", str(index), "--probe_epochs", "0") == 0
    assert cli("tune", "--concept_index", str(index), "--embeddings", str(tmp_path / "train.npz"), "--valid_concepts",
               str(concepts), "--concept_settings", str(settings)) == 0
    capsys.readouterr()
    predict = ["predict", "--concept_index", str(index), "--concept_settings", str(settings), "--method", "knn"]
    assert cli(*predict, "--embeddings", str(tmp_path / "other.npz"), "--output_csv", str(tmp_path / "o.csv")) == 2
    err = capsys.readouterr().err
    assert "weights" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o.csv").exists()
    assert cli(*predict, "--embeddings", str(tmp_path / "train.npz"), "--output_csv", str(tmp_path / "t.csv")) == 0


def test_llava_vectors_of_an_older_version_without_a_weights_fingerprint_are_refused_in_one_line(tmp_path, capsys):
    old = {"family": "llava", "name": "clip_vision_model", "source": "llava", "pooling": "mean", "feature_layer": -2,
           "dim": 4}
    ids = ["a", "b"]
    save_embeddings(tmp_path / "old.npz", Embeddings(ids, [np.eye(2, 4, dtype=np.float32)], [old]))
    (tmp_path / "concepts.csv").write_text("ID,CUIs\na,C0000001\nb,C0000002\n")
    assert cli("fit", "--embeddings", str(tmp_path / "old.npz"), "--train_concepts", str(tmp_path / "concepts.csv"),
               "--concept_index", str(tmp_path / "index")) == 2
    err = capsys.readouterr().err
    assert "older version" in err and "embed the training images again" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "index").exists()


def test_the_llava_processor_is_pinned_to_the_pil_backend_and_leaves_the_tokenizer_alone(tiny_model):
    """Generation and the llava encoder share load_processor; left to itself, transformers would take its
    torchvision image processor where torchvision is installed and resize differently. (On a machine without
    torchvision both backends resolve to PIL: this checks the pin and that the tokenizer is left alone.)"""
    from transformers import AutoImageProcessor

    from jjvmed.encoders import HFPreprocess, blank_image
    from jjvmed.model import load_processor

    processor = load_processor(str(tiny_model))
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert processor.tokenizer.backend == "tokenizers"  # `backend=` given to AutoProcessor would land here
    pil = AutoImageProcessor.from_pretrained(str(tiny_model), backend="pil")
    assert np.array_equal(HFPreprocess(processor.image_processor)([blank_image()]).numpy(),
                          HFPreprocess(pil)([blank_image()]).numpy())


# ---------------------------------------------------------------------------------------------
# The embeddings file: what it keeps, what it counts, what it says
# ---------------------------------------------------------------------------------------------


def images_with_a_bad_one(images: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(images, folder)
    (folder / "img_0_bad.png").write_bytes(b"not a png")  # first in natural order
    return folder


def test_a_trial_on_a_few_images_keeps_the_failures_of_the_others_in_the_file(specs, images, tmp_path, capsys):
    """The file lists every image it was given, embedded or not: a run that reads it later (knn, predict) writes
    a row for the unreadable one too."""
    folder = images_with_a_bad_one(images, tmp_path / "images")
    out = tmp_path / "emb.npz"
    flags = ["--image_dir", str(folder), "--embeddings", str(out), "--encoder", specs["hf-clip"], "--num_workers", "0"]
    assert cli("embed", *flags) == 0
    assert "img_0_bad" in load_embeddings(out).failed
    items = sorted(p.stem for p in folder.iterdir())
    few = tmp_path / "few"
    few.mkdir()
    for name in ("img_2.png", "img_3.png"):
        (few / name).write_bytes((folder / name).read_bytes())
    assert cli("embed", *flags[2:], "--image_dir", str(few)) == 0
    emb = load_embeddings(out)
    assert sorted([*emb.ids, *emb.failed]) == items and "img_0_bad" in emb.failed


def test_embed_counts_an_unreadable_image_as_failed_not_as_embedded(specs, images, tmp_path, capsys):
    folder = images_with_a_bad_one(images, tmp_path / "images")
    assert cli("embed", "--image_dir", str(folder), "--embeddings", str(tmp_path / "e.npz"), "--encoder",
               specs["hf-clip"], "--num_workers", "0") == 0
    err = capsys.readouterr().err
    assert "0 images reused, 7 embedded, 1 failed" in err, err
    assert "images: 8 (embedded now: 7, reused: 0, failed: 1)" in err, err


def test_an_ensemble_run_counts_per_encoder_what_it_reused_and_what_it_embedded(specs, images, tmp_path, capsys):
    """A file of one encoder's vectors, then a run with a second encoder too: the first one's are all kept."""
    out = tmp_path / "e.npz"
    clip, dino = specs["hf-clip"], specs["hf-dinov2"]
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", clip) == 0
    capsys.readouterr()
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", clip, "--encoder",
               dino) == 0
    err = capsys.readouterr().err
    assert f"0 images reused, 7 embedded; by encoder: {clip} 7 reused, 0 embedded, {dino} 0 reused, 7 embedded" \
        in err, err
    assert [e["source"] for e in load_embeddings(out).encoders] == [clip, dino]


def test_an_encoder_folder_named_another_way_reuses_its_vectors(specs, images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "e.npz"
    clip = specs["hf-clip"]
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", clip) == 0
    folder = Path(clip.partition(":")[2])
    monkeypatch.chdir(folder.parent)
    capsys.readouterr()
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", f"hf:./{folder.name}") == 0
    assert "7 images reused, 0 embedded" in capsys.readouterr().err


def test_a_limit_trial_on_an_unfinished_ensemble_keeps_the_other_vectors_for_the_full_run(specs, images, tmp_path,
                                                                                          capsys):
    """A two-encoder embed stopped during its second encoder, then a trial with --limit: the first encoder's
    vectors of the images outside the trial are not thrown away (nor is --overwrite asked for); the full run
    after it embeds only what is missing."""
    clip, dino = specs["hf-clip"], specs["hf-dinov2"]
    flags = ["--image_dir", str(images), "--encoder", clip, "--encoder", dino]
    full = tmp_path / "full.npz"
    assert cli("embed", "--embeddings", str(full), *flags) == 0
    from jjvmed.embeddings import EmbedOptions

    keys = EmbedOptions(encoders=(clip, dino)).made_with()
    done = load_embeddings(full)
    out = tmp_path / "cut.npz"
    parts = tmp_path / "cut.npz.parts"
    parts.mkdir()
    save_embeddings(parts / "chunk-000000.npz", Embeddings(done.ids, [done.vectors[0]], [done.encoders[0]],
                                                           meta={"made_with": [keys[0]]}, identities=done.identities))
    capsys.readouterr()
    assert cli("embed", "--embeddings", str(out), *flags, "--limit", "2") == 0
    err = capsys.readouterr().err
    assert "--overwrite" not in err and "5 other images lack one of this run's encoders" in err, err
    assert load_embeddings(out).ids == done.ids[:2]
    assert cli("embed", "--embeddings", str(out), *flags) == 0
    err = capsys.readouterr().err
    assert f"{clip} 7 reused, 0 embedded, {dino} 2 reused, 5 embedded" in err, err
    got = load_embeddings(out)
    assert got.ids == done.ids and not parts.exists()
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(got.vectors, done.vectors, strict=True))


def test_new_weights_in_an_encoder_folder_are_noticed_though_every_image_is_unchanged(images, tmp_path, capsys):
    """The vectors of a model folder whose files were replaced are not reused as they were: the model is
    loaded once to compare, and every image embedded again with the new weights."""
    folder = save_hf_clip_vision(tmp_path / "clip")
    spec = f"hf:{folder}"
    out, fresh = tmp_path / "e.npz", tmp_path / "fresh.npz"
    flags = ["--image_dir", str(images), "--encoder", spec, "--num_workers", "0"]
    assert cli("embed", "--embeddings", str(out), *flags) == 0
    before = load_embeddings(out)
    save_hf_clip_vision(folder)  # other random weights, the same folder
    capsys.readouterr()
    assert cli("embed", "--embeddings", str(out), *flags) == 0
    err = capsys.readouterr().err
    assert "embedding every image again" in err and "0 images reused, 7 embedded" in err, err
    assert cli("embed", "--embeddings", str(fresh), *flags) == 0
    again, new = load_embeddings(out), load_embeddings(fresh)
    assert again.encoders[0]["weights"] == new.encoders[0]["weights"] != before.encoders[0]["weights"]
    assert np.allclose(again.vectors[0], new.vectors[0], atol=1e-6)


def test_files_of_the_same_images_in_another_row_order_make_one_ensemble(specs, images, tmp_path):
    """A run over an ID list writes its rows in the list's order; the files still hold the same images."""
    from jjvmed.embeddings import load_ensemble

    a, b, shuffled = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "b_shuffled.npz"
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(a), "--encoder", specs["hf-clip"]) == 0
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(b), "--encoder", specs["hf-dinov2"]) == 0
    emb = load_embeddings(b)
    order = list(reversed(range(len(emb.ids))))
    save_embeddings(shuffled, Embeddings([emb.ids[n] for n in order], [emb.vectors[0][order]], emb.encoders,
                                         meta=emb.meta, identities=emb.identities))
    expected, got = load_ensemble([str(a), str(b)]), load_ensemble([str(a), str(shuffled)])
    assert got.ids == expected.ids
    assert all(np.array_equal(x, y) for x, y in zip(got.vectors, expected.vectors, strict=True))


def test_a_bad_embeddings_path_or_file_is_one_line_that_says_what_to_do(specs, images, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.npz").write_text("ID,Caption\na,b\n")
    cut = tmp_path / "cut.npz"
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(cut), "--encoder", specs["hf-clip"]) == 0
    cut.write_bytes(cut.read_bytes()[:3000])
    capsys.readouterr()
    cases = {str(tmp_path / "folder"): "is a folder", str(tmp_path / "notes.npz"): "not an .npz file",
             str(cut): "add --overwrite", str(tmp_path / "notes.npz" / "x.npz"): "is not a folder"}
    for path, expected in cases.items():
        assert cli("embed", "--image_dir", str(images), "--embeddings", path, "--encoder", specs["hf-clip"]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert "pickle" not in err


def test_a_whole_clip_checkpoint_embeds_with_its_own_vision_tower_and_projection(images, tmp_path, capsys):
    """A CLIPModel folder (both towers, projection 16 wide) used to fail after a report of every text weight."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    folder = save_hf_clip(tmp_path / "clip", seed=0)
    out = tmp_path / "e.npz"
    capsys.readouterr()
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", f"hf:{folder}") == 0
    err = capsys.readouterr().err
    assert "UNEXPECTED" not in err and "text_model" not in err, err
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=[Image.open(images / "img_1.png").convert("RGB")], return_tensors="pt")
        expected = model.get_image_features(**pixels)
    expected = getattr(expected, "pooler_output", expected)
    expected = torch.nn.functional.normalize(expected, dim=-1)[0].numpy()
    emb = load_embeddings(out)
    assert emb.vectors[0].shape[1] == 16
    assert np.allclose(emb.vectors[0][emb.ids.index("img_1")], expected, atol=1e-5)


def test_a_checkpoint_missing_weights_of_the_vision_model_is_refused_in_one_line(images, tmp_path, capsys):
    """A model.safetensors without one of DINOv2's layers used to load silently, that layer left random."""
    from safetensors.torch import load_file, save_file

    folder = save_hf_dinov2(tmp_path / "dino")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer.1." not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "e.npz"
    capsys.readouterr()
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(out), "--encoder", f"hf:{folder}") == 2
    err = capsys.readouterr().err
    missing = sum("layer.1." in k for k in weights)
    assert f"{missing} weights of the model are missing from its checkpoint" in err and "encoder.layer.1." in err, err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error:" in line] == \
        [err.splitlines()[-1]], err  # one line (transformers' progress bar aside)
    assert not out.exists()


def test_an_ensemble_trial_on_a_finished_file_of_one_encoder_is_refused_and_leaves_the_file_whole(specs, images,
                                                                                                  tmp_path, capsys):
    """`embed --encoder A` over every image, then `--encoder A --encoder B --limit 2` on the same file: it used
    to exit 0 with the file cut to 2 rows, the other vectors moved into <file>.parts/ where a later --overwrite
    deleted them."""
    clip, dino = specs["hf-clip"], specs["hf-dinov2"]
    out = tmp_path / "train.npz"
    flags = ["--image_dir", str(images), "--embeddings", str(out), "--num_workers", "0"]
    assert cli("embed", *flags, "--encoder", clip) == 0
    before = load_embeddings(out)
    capsys.readouterr()
    assert cli("embed", *flags, "--encoder", clip, "--encoder", dino, "--limit", "2") == 2
    err = capsys.readouterr().err
    assert "5 other images" in err and "another --embeddings" in err and "--overwrite" not in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    after = load_embeddings(out)
    assert after.ids == before.ids and len(after.encoders) == 1 and np.array_equal(after.vectors[0], before.vectors[0])
    assert not (tmp_path / "train.npz.parts").exists()
    assert cli("embed", *flags, "--encoder", clip) == 0
    assert "7 images reused, 0 embedded" in capsys.readouterr().err
    trial = tmp_path / "trial.npz"
    assert cli("embed", *flags[:2], "--embeddings", str(trial), "--encoder", clip, "--encoder", dino, "--limit", "2",
               "--num_workers", "0") == 0
    assert len(load_embeddings(trial).ids) == 2


def test_a_knn_trial_of_an_ensemble_index_on_a_finished_file_of_one_encoder_is_refused_before_any_work(
        specs, images, tiny_model, tmp_path, capsys):
    """The same guard in a generate_concepts.py knn run whose index uses two encoders, pointed with --limit at a
    file one encoder made of every image."""
    from conftest import run_in_process

    clip = specs["hf-clip"]
    fit_ensemble_index(specs, images, tmp_path, probe_epochs=0)
    settings = json.loads((tmp_path / "settings.json").read_text())
    for member in settings["methods"]["knn"]["members"]:  # tuning on 7 random images may drop one encoder
        member["knn"] = 0.5
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    single = tmp_path / "single.npz"
    assert cli("embed", "--image_dir", str(images), "--embeddings", str(single), "--encoder", clip,
               "--num_workers", "0") == 0
    before = load_embeddings(single)
    out = tmp_path / "knn.csv"
    done = run_in_process("generate_concepts.py", "--image_dir", str(images), "--output_csv", str(out), "--method",
                          "knn", "--concept_index", str(tmp_path / "index"), "--concept_settings",
                          str(tmp_path / "settings.json"), "--base_model_path", str(tiny_model), "--embeddings",
                          str(single), "--limit", "2", "--num_workers", "0")
    assert done.returncode == 2, done.stderr
    assert "5 other images" in done.stderr and "another --embeddings" in done.stderr, done.stderr
    assert not out.exists() and load_embeddings(single).ids == before.ids
    assert len(load_embeddings(single).encoders) == 1 and not (tmp_path / "single.npz.parts").exists()
