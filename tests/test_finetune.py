"""finetune.py: answer-only loss, data problems counted, QLoRA, a tiny model that learns, unreadable images,
signals and resume, several processes, the loss curve and --help."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROCOV2, ROOT, needs_rocov2, read_csv, run_in_process, run_script, tiny_args
from PIL import Image
from safetensors.torch import load_file

import finetune
from jjvmed import errors, files, training
from jjvmed.cui_mapper import load_mapper
from jjvmed.model import ModelSpec, load_model, load_processor

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_split(folder: Path, per_colour: int, seed: int) -> Path:
    """Images whose correct caption is their colour word."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = [["ID", "Caption"]]
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            shade = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in rgb)
            Image.new("RGB", (64, 48), shade).save(folder / f"{name}_{i}.png")
            rows.append([f"{name}_{i}", name])
    files.write_csv_atomic(folder.with_suffix(".csv"), None, rows)
    return folder


def captions(csv_path: Path) -> dict[str, str]:
    return dict((i, c) for i, c in read_csv(csv_path)[1:])


def small_args(images: Path, model: Path, out: Path, *extra: str) -> list[str]:
    """A fast run on the captions in <images>.csv: batch 1, no accumulation, no workers, no gradient
    checkpointing, the loss logged every step."""
    return ["--image_dir", str(images), "--train_captions", str(images.with_suffix(".csv")), "--base_model_path",
            str(model), "--output_dir", str(out), "--batch_size", "1", "--gradient_accumulation_steps", "1",
            "--num_workers", "0", "--no-gradient_checkpointing", "--logging_steps", "1", *extra]


def test_a_short_lora_run_teaches_the_tiny_model_the_colour_captions(tiny_model, tmp_path):
    train = colour_split(tmp_path / "train", 12, seed=0)
    valid = colour_split(tmp_path / "valid", 3, seed=1)
    adapter = tmp_path / "adapter"
    assert finetune.main(small_args(train, tiny_model, adapter, "--epochs", "6", "--learning_rate", "5e-3",
                                    "--batch_size", "8", "--warmup_ratio", "0", "--save_steps", "1000",
                                    "--valid_image_dir", str(valid), "--valid_captions",
                                    str(valid.with_suffix(".csv")), "--eval_images", "12")) == 0
    assert (adapter / "adapter_model.safetensors").exists()
    summary = json.loads((adapter / "finetune_summary.json").read_text())
    assert summary["validation"]["caption_images"] == 12 and 0.0 <= summary["validation"]["caption_rouge1"] <= 1.0
    truth = captions(valid.with_suffix(".csv"))

    def caption_run(name: str, *extra: str) -> dict[str, str]:
        out = tmp_path / f"{name}.csv"
        result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, valid, "--max_new_tokens", "3",
                                                                    "--prompt_template", "vicuna", *extra))
        assert result.returncode == 0, result.stderr
        return captions(out)

    tuned = caption_run("tuned", "--adapter_repo", str(adapter))
    untrained = caption_run("untrained")
    # The answer must open with the right colour (the tiny model has not learnt to stop after it).
    assert sum(tuned[i].startswith(truth[i]) for i in truth) >= 0.75 * len(truth), tuned
    assert sum(untrained[i].startswith(truth[i]) for i in truth) <= 0.25 * len(truth), untrained


def test_labels_keep_only_the_answer_tokens(tiny_model, tmp_path):
    images = colour_split(tmp_path / "imgs", 1, seed=0)
    processor = load_processor(str(tiny_model))
    example = training.Example("red_0", str(images / "red_0.png"), "caption", "red")
    item = training.TrainDataset([example], processor, "vicuna", "es", 1024)[0]
    kept = item["labels"][item["labels"] != training.IGNORE]
    assert processor.tokenizer.decode(kept) == " red<|end_of_text|>"
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    masked = item["input_ids"][item["labels"] == training.IGNORE]
    assert int((masked == image_token).sum()) == 576  # image tokens are in the masked part
    prompt = processor.tokenizer.decode(masked[masked != image_token])
    assert prompt.endswith("¿Cuál es la descripción o el pie de foto de esta imagen médica?\nASSISTANT:")
    batch = training.Collator(processor.tokenizer.pad_token_id)([item, {**item, "input_ids": item["input_ids"][:-3],
                                                                         "labels": item["labels"][:-3]}])
    assert (batch["labels"][1, -3:] == training.IGNORE).all() and (batch["attention_mask"][1, -3:] == 0).all()


@needs_rocov2
def test_concept_examples_use_the_trained_answer_format(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(images / f"{name}.png")
    (tmp_path / "concepts.csv").write_text("ID,CUIs\na,C0040405;C0817096\nb,\nc,C0016522\n")
    names = load_mapper(str(ROCOV2)).names
    examples, _, _ = training.build_examples(str(images), None, str(tmp_path / "concepts.csv"), names)
    answers = {e.image_id: e.answer for e in examples}
    assert answers == {
        "a": "Los conceptos médicos clave son: X-Ray Computed Tomography, Chest",
        "b": "ningún concepto médico específico fue identificado",
        "c": "Los conceptos médicos clave son: Foramen Ovale, Patent",
    }


@needs_rocov2
def test_bad_training_data_is_counted_and_reported_not_fatal(tiny_model, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b", "c", "orphan"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(images / f"{name}.png")
    (tmp_path / "imgs.csv").write_text("ID,Caption\na,red\nb,\nmissing,red\nc,red\n")
    (tmp_path / "concepts.csv").write_text("ID,CUIs\na,C0817096\nc,C9999999\n")
    out = tmp_path / "adapter"
    assert finetune.main(small_args(images, tiny_model, out, "--train_concepts", str(tmp_path / "concepts.csv"),
                                    "--cui_mapping_file", str(ROCOV2), "--max_steps", "1", "--batch_size", "2")) == 0
    err = capsys.readouterr().err
    assert "examples: 3 (2 caption, 1 concepts)" in err
    assert "ID in a CSV but no image file: 1 (first: missing; listed in finetune_errors.csv)" in err
    assert [r[0] for r in read_csv(out / "finetune_errors.csv")] == ["ID", "missing"]
    assert "{'loss'" not in err and err.count("step 1/1: loss") == 1  # each step logged once, as one plain line
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # as readable as the other outputs
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~files.current_umask()
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["skipped"] == {"ID in a CSV but no image file": 1, "empty caption": 1,
                                  "ID in one CSV and not the other": 1, "CUI not in the mapping file (left out)": 1,
                                  "concept row with no known CUI": 1, "image file with no CSV row": 1}


def test_qlora_trains_on_a_4bit_base_and_saves_a_loadable_adapter(tiny_model, tmp_path):
    train = colour_split(tmp_path / "train", 2, seed=0)
    adapter = tmp_path / "adapter"
    # Gradient checkpointing on (the default), so the 4-bit path sets it up as a real QLoRA run does.
    assert finetune.main(small_args(train, tiny_model, adapter, "--max_steps", "2", "--batch_size", "4",
                                    "--load_in_4bit", "--learning_rate", "1e-3", "--gradient_checkpointing")) == 0
    model, _, _ = load_model(ModelSpec(str(tiny_model), str(adapter), device="cpu"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_finetune_needs_some_data(tmp_path):
    with pytest.raises(errors.UserError, match="--train_captions and/or --train_concepts"):
        finetune.main(["--image_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")])


def test_training_resumes_from_its_latest_checkpoint(tiny_model, tmp_path):
    train = colour_split(tmp_path / "train", 2, seed=0)
    out = tmp_path / "adapter"
    args = small_args(train, tiny_model, out, "--batch_size", "2", "--save_steps", "1")
    assert finetune.main([*args, "--max_steps", "2"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # Mark the latest checkpoint's state: a resumed run carries the mark on, a restarted one would not.
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 2, "resume_marker": 1})
    state_file.write_text(json.dumps(state))
    assert finetune.main([*args, "--max_steps", "3", "--resume_from_checkpoint", "auto"]) == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["resumed_from_step"] == 2
    final_state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert {"step": 2, "resume_marker": 1} in final_state["log_history"]


def truncated_jpeg(path: Path) -> None:
    """A JPEG whose header is intact and whose pixel data stops half-way: only full decoding notices."""
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_file_that_is_not_an_image_is_listed_and_skipped_and_the_rest_trains(tiny_model, tmp_path, capsys):
    images = colour_split(tmp_path / "imgs", 2, seed=0)  # 8 images
    (images / "green_1.png").write_text("not an image: a text file with an image's name\n")
    out = tmp_path / "adapter"
    assert finetune.main(small_args(images, tiny_model, out, "--max_steps", "2", "--batch_size", "2")) == 0
    assert "skipped: image cannot be read: 1 (1 examples)" in capsys.readouterr().err
    assert read_csv(out / "finetune_errors.csv") == [
        ["ID", "Error"], ["green_1", f"UnidentifiedImageError: cannot identify image file '{images / 'green_1.png'}'"]]
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["examples"] == {"caption": 7} and summary["unreadable_images"] == 1
    assert summary["skipped"] == {"image cannot be read (listed in finetune_errors.csv)": 1}
    # 2 steps of 2 rows from one shuffled epoch of 7: 4 different examples.
    assert (summary["global_step"], summary["samples_trained"], summary["examples_trained"]) == (2, 4, 4)
    assert (out / "adapter_model.safetensors").exists()


def test_an_image_that_fails_only_when_decoded_is_replaced_counted_and_listed(tiny_model, tmp_path, capsys):
    images = colour_split(tmp_path / "imgs", 1, seed=0)  # red_0, green_0, blue_0, yellow_0
    (images / "blue_0.png").unlink()
    truncated_jpeg(images / "blue_0.jpg")
    out = tmp_path / "adapter"
    # One epoch of 4 examples in 2 steps of 2; a DataLoader worker decodes, so the failure crosses processes.
    args = small_args(images, tiny_model, out, "--epochs", "1", "--batch_size", "2", "--num_workers", "1")
    assert finetune.main(args) == 0
    assert "skipped: image cannot be read" not in capsys.readouterr().err  # the header check let it through
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["examples"] == {"caption": 4} and summary["global_step"] == 2
    assert summary["samples_trained"] == 4  # full batches: a stand-in took the broken image's place
    assert summary["examples_trained"] == 3 and summary["unreadable_images"] == 1
    rows = read_csv(out / "finetune_errors.csv")
    assert [r[0] for r in rows] == ["ID", "blue_0"] and rows[1][1].startswith("OSError: image file is truncated")


def interrupted_run(argv: list[str], signum: int) -> subprocess.CompletedProcess:
    """Start finetune.py, send `signum` as soon as training has started, return how it ended."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen = []
    for line in proc.stderr:  # lines may start with progress-bar output, hence `in`
        seen.append(line)
        if "training started at step 0" in line:
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory) -> Path:
    """The reference: 3 images x 2 epochs = 6 steps in one go."""
    root = tmp_path_factory.mktemp("uninterrupted")
    images = colour_split(root / "imgs", 1, seed=0)
    (images / "yellow_0.png").unlink()
    assert finetune.main(small_args(images, tiny_model, root / "adapter", "--epochs", "2")) == 0
    return root


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(
        tiny_model, tmp_path, uninterrupted, signum):
    images = uninterrupted / "imgs"
    out = tmp_path / "adapter"
    argv = small_args(images, tiny_model, out, "--epochs", "2")
    result = interrupted_run(argv, signum)
    assert result.returncode == 128 + signum, result.stderr[-3000:]  # 143 for SIGTERM, 130 for Ctrl-C
    assert f"stopped by {signum.name} at step" in result.stderr
    assert f"python {ROOT / 'finetune.py'} {' '.join(argv)} --resume_from_checkpoint auto" in result.stderr
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (out / "adapter_model.safetensors").exists()
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    assert 1 <= stopped_at < 6

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert finetune.main([*argv, "--resume_from_checkpoint", "auto"]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back after training
    resumed = json.loads((out / "finetune_summary.json").read_text())
    reference = json.loads((uninterrupted / "adapter" / "finetune_summary.json").read_text())
    assert resumed["resumed_from_step"] == stopped_at
    for key in ("global_step", "samples_trained", "examples_trained"):
        assert resumed[key] == reference[key], key  # counts cover the steps before the stop too
    assert reference["global_step"] == 6 and reference["samples_trained"] == 6
    # Same seed, same data order, same weights: the resume continued the run instead of starting another.
    ours = load_file(out / "adapter_model.safetensors")
    theirs = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)


def test_torchrun_two_cpu_processes_train_one_adapter_with_the_global_batch(tiny_model, tmp_path):
    images = colour_split(tmp_path / "imgs", 2, seed=0)
    (images / "red_1.png").write_bytes(b"")  # each process must agree on what is skipped
    out = tmp_path / "adapter"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = small_args(images, tiny_model, out, "--max_steps", "2", "--gradient_accumulation_steps", "2")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "finetune.py"), *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch: 4 = 1 per device x 2 accumulation x 2 processes" in result.stderr
    assert result.stderr.count("adapter saved to") == 1  # only rank 0 writes
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert (summary["world_size"], summary["global_batch_size"], summary["global_step"]) == (2, 4, 2)
    assert summary["samples_trained"] == 8 and summary["examples"] == {"caption": 7}
    assert [r[0] for r in read_csv(out / "finetune_errors.csv")] == ["ID", "red_1"]
    model, _, _ = load_model(ModelSpec(str(tiny_model), str(out), device="cpu"))  # checks every tensor landed
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_the_loss_curve_is_a_png_with_a_validation_panel_when_scores_exist(tiny_model, tmp_path):
    images = colour_split(tmp_path / "imgs", 1, seed=0)
    out = tmp_path / "adapter"
    assert finetune.main(small_args(images, tiny_model, out, "--max_steps", "3")) == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["loss_curve"] == str(out / "loss_curve.png")
    losses = [e["loss"] for e in json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
              if "loss" in e]
    assert len(losses) == 3  # every step is on the curve, the first included
    with Image.open(out / "loss_curve.png") as plain:
        assert plain.format == "PNG" and plain.size == (700, 400)
    history = [{"step": s, "loss": 3.0 / s} for s in range(1, 11)]
    png = training.loss_curve_png(history, {"caption_rouge1": 0.31, "concepts_f1": 0.42, "caption_images": 5}, "t")
    path = tmp_path / "with_validation.png"
    path.write_bytes(png)
    with Image.open(path) as panels:
        assert panels.size == (900, 400)  # the second panel


def test_every_option_is_explained_in_help_with_its_default():
    parser = finetune.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 31
    unexplained = [a.option_strings[0] for a in options
                   if not a.help or not ("default" in a.help or a.required)]
    assert unexplained == []
    text = run_script("finetune.py", "--help", timeout=60).stdout
    assert "(default: 5e-05)" in text and "(default: xtuner/llava-llama-3-8b-v1_1-transformers)" in text


def test_help_loads_neither_torch_nor_matplotlib():
    code = ("import sys, finetune; finetune.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize("extra, expected", [
    (["--max_length", "100"], "--max_length 100 would cut into the 576 image tokens"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--lora_r", "0"], "--lora_r must be at least 1"),
    (["--lr_scheduler", "foo"], "--lr_scheduler foo is not one of linear, cosine"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be from 0 up to"),
    (["--train_captions", "LATIN1"], "is not UTF-8"),
    (["--valid_image_dir", "IMAGES", "--valid_concepts", "LATIN1", "--cui_mapping_file", "NAMES"], "is not UTF-8"),
    (["--valid_image_dir", "IMAGES", "--valid_concepts", "CAPTIONS"], "--valid_concepts needs --cui_mapping_file"),
], ids=["max_length", "batch_size", "accumulation", "lora_r", "scheduler", "warmup", "latin-1 training",
        "latin-1 validation", "no mapping"])
def test_options_that_would_fail_once_the_model_is_loaded_are_one_line_before_anything_loads(tmp_path, extra,
                                                                                            expected):
    """The base model does not exist: had the run gone on to load it, the error would name the model instead."""
    images = colour_split(tmp_path / "imgs", 1, seed=0)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("ID,Caption\nred_0,Radiografía de tórax\n".encode("latin-1"))
    names = {"LATIN1": str(latin1), "IMAGES": str(images), "CAPTIONS": str(images.with_suffix(".csv")),
             "NAMES": str(tmp_path / "names.csv")}
    done = run_in_process("finetune.py", *small_args(images, Path("/no/such/model"), tmp_path / "out"),
                          *[names.get(a, a) for a in extra])
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_validation_concept_f1_is_what_the_generate_scripts_csv_scores(tiny_model, tmp_path, monkeypatch):
    """Over every image of the ground truth, CUIs unknown to the mapping file included; an answer that maps to
    no CUI is the CSV row 'ID,', which the official reader takes as the concept ''. (Answers of 8 tokens on
    both sides, instead of 150, to keep the test short.)"""
    from jjvmed import prompts
    from jjvmed.scores import concept_scores
    from jjvmed.submission import concept_pairs, read_rows

    valid = colour_split(tmp_path / "valid", 1, seed=1)
    truth_csv = tmp_path / "valid_concepts.csv"
    truth_csv.write_text("ID,CUIs\nred_0,C0000001\ngreen_0,C9999999\nblue_0,\nyellow_0,C0000001;C0000004\n")
    mapping = tmp_path / "names.csv"
    mapping.write_text("CUI,Name\nC0000001,Red\nC0000004,Yellow\n")
    args = finetune.build_parser().parse_args([
        "--image_dir", str(valid), "--output_dir", str(tmp_path / "out"), "--valid_image_dir", str(valid),
        "--valid_concepts", str(truth_csv), "--cui_mapping_file", str(mapping), "--batch_size", "4"])
    monkeypatch.setitem(prompts.MAX_NEW_TOKENS, "concepts", 8)
    model, processor, _ = load_model(ModelSpec(str(tiny_model), None, device="cpu"))
    mapper = load_mapper(str(mapping))
    scored = finetune.validation_scores(model, processor, args, mapper, finetune.read_validation_truth(args))
    out = tmp_path / "concepts.csv"
    done = run_in_process("generate_concepts.py", *tiny_args(tiny_model, out, valid, "--prompt_template", "vicuna",
                                                             "--cui_mapping_file", str(mapping)))
    assert done.returncode == 0, done.stderr
    csv_f1 = concept_scores(concept_pairs(read_rows(truth_csv)), concept_pairs(read_rows(out)))[0]["f1"]
    assert scored["concepts_images"] == 4 and scored["concepts_f1"] == pytest.approx(csv_f1, abs=1e-12)
