"""finetune.py: answer-only loss, data problems counted, QLoRA, and a tiny model that learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import SHARED_DATA, read_csv
from PIL import Image

import common
import errors
import files
import finetune
import generate_captions
from model import ModelSpec, load_model, load_processor

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


def test_a_short_lora_run_teaches_the_tiny_model_the_colour_captions(tiny_model, tmp_path):
    train = colour_split(tmp_path / "train", 12, seed=0)
    valid = colour_split(tmp_path / "valid", 3, seed=1)
    adapter = tmp_path / "adapter"
    assert finetune.main(["--image_dir", str(train), "--captions_csv", str(train.with_suffix(".csv")),
                          "--base_model_path", str(tiny_model), "--output_dir", str(adapter), "--epochs", "6",
                          "--learning_rate", "5e-3", "--batch_size", "8", "--gradient_accumulation_steps", "1",
                          "--warmup_ratio", "0", "--num_workers", "0", "--save_steps", "1000",
                          "--no-gradient_checkpointing", "--valid_image_dir", str(valid),
                          "--valid_captions_csv", str(valid.with_suffix(".csv")), "--eval_images", "12"]) == 0
    assert (adapter / "adapter_model.safetensors").exists()
    summary = json.loads((adapter / "finetune_summary.json").read_text())
    assert summary["validation"]["caption_images"] == 12 and 0.0 <= summary["validation"]["caption_rouge1"] <= 1.0
    truth = captions(valid.with_suffix(".csv"))

    def caption_run(name: str, *extra: str) -> dict[str, str]:
        out = tmp_path / f"{name}.csv"
        argv = ["--image_dir", str(valid), "--output_csv", str(out), "--base_model_path", str(tiny_model),
                "--max_new_tokens", "3", "--num_workers", "0", "--prompt_template", "vicuna", *extra]
        assert errors.run_cli(generate_captions.main, argv) == 0
        return captions(out)

    tuned = caption_run("tuned", "--adapter_repo", str(adapter))
    untrained = caption_run("untrained", "--adapter_repo", "none")
    # The answer must open with the right colour (the tiny model has not learnt to stop after it).
    assert sum(tuned[i].startswith(truth[i]) for i in truth) >= 0.75 * len(truth), tuned
    assert sum(untrained[i].startswith(truth[i]) for i in truth) <= 0.25 * len(truth), untrained


def test_labels_keep_only_the_answer_tokens(tiny_model, tmp_path):
    images = colour_split(tmp_path / "imgs", 1, seed=0)
    processor = load_processor(str(tiny_model))
    example = finetune.Example("red_0", str(images / "red_0.png"), "caption", "red")
    item = finetune.TrainDataset([example], processor, "vicuna", "es", 1024)[0]
    kept = item["labels"][item["labels"] != finetune.IGNORE]
    assert processor.tokenizer.decode(kept) == " red<|end_of_text|>"
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    masked = item["input_ids"][item["labels"] == finetune.IGNORE]
    assert int((masked == image_token).sum()) == 576  # image tokens are in the masked part
    prompt = processor.tokenizer.decode(masked[masked != image_token])
    assert prompt.endswith("¿Cuál es la descripción o el pie de foto de esta imagen médica?\nASSISTANT:")
    batch = finetune.Collator(processor.tokenizer.pad_token_id)([item, {**item, "input_ids": item["input_ids"][:-3],
                                                                         "labels": item["labels"][:-3]}])
    assert (batch["labels"][1, -3:] == finetune.IGNORE).all() and (batch["attention_mask"][1, -3:] == 0).all()


def test_concept_examples_use_the_trained_answer_format(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(images / f"{name}.png")
    (tmp_path / "concepts.csv").write_text("ID,CUIs\na,C0040405;C0817096\nb,\nc,C0016522\n")
    names = common.load_mapper(str(SHARED_DATA / "rocov2" / "cui_mapping.csv")).names
    examples, _ = finetune.build_examples(str(images), None, str(tmp_path / "concepts.csv"), names)
    answers = {e.image_id: e.answer for e in examples}
    assert answers == {
        "a": "Los conceptos médicos clave son: X-Ray Computed Tomography, Chest",
        "b": "ningún concepto médico específico fue identificado",
        "c": "Los conceptos médicos clave son: Foramen Ovale, Patent",
    }


def test_bad_training_data_is_counted_and_reported_not_fatal(tiny_model, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b", "c", "orphan"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(images / f"{name}.png")
    (tmp_path / "captions.csv").write_text("ID,Caption\na,red\nb,\nmissing,red\nc,red\n")
    (tmp_path / "concepts.csv").write_text("ID,CUIs\na,C0817096\nc,C9999999\n")
    out = tmp_path / "adapter"
    code = finetune.main(["--image_dir", str(images), "--captions_csv", str(tmp_path / "captions.csv"),
                          "--concepts_csv", str(tmp_path / "concepts.csv"), "--cui_mapping_file",
                          str(SHARED_DATA / "rocov2" / "cui_mapping.csv"), "--base_model_path", str(tiny_model),
                          "--output_dir", str(out), "--max_steps", "1", "--batch_size", "2",
                          "--gradient_accumulation_steps", "1", "--num_workers", "0", "--no-gradient_checkpointing"])
    assert code == 0
    err = capsys.readouterr().err
    assert "examples: 3 (2 caption, 1 concepts)" in err
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["skipped"] == {"ID in a CSV but no image file": 1, "empty caption": 1,
                                  "ID in one CSV and not the other": 1, "CUI not in the mapping file (left out)": 1,
                                  "concept row with no known CUI": 1, "image file with no CSV row": 1}


def test_qlora_trains_on_a_4bit_base_and_saves_a_loadable_adapter(tiny_model, tmp_path):
    train = colour_split(tmp_path / "train", 2, seed=0)
    adapter = tmp_path / "adapter"
    assert finetune.main(["--image_dir", str(train), "--captions_csv", str(train.with_suffix(".csv")),
                          "--base_model_path", str(tiny_model), "--output_dir", str(adapter), "--max_steps", "2",
                          "--batch_size", "4", "--gradient_accumulation_steps", "1", "--num_workers", "0",
                          "--load_in_4bit", "--learning_rate", "1e-3"]) == 0
    model, _, _ = load_model(ModelSpec(str(tiny_model), str(adapter), device="cpu"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_finetune_needs_some_data(tmp_path):
    with pytest.raises(errors.UserError, match="--captions_csv and/or --concepts_csv"):
        finetune.main(["--image_dir", str(tmp_path), "--output_dir", str(tmp_path / "o")])


def test_training_resumes_from_its_latest_checkpoint(tiny_model, tmp_path):
    train = colour_split(tmp_path / "train", 2, seed=0)
    out = tmp_path / "adapter"
    args = ["--image_dir", str(train), "--captions_csv", str(train.with_suffix(".csv")), "--base_model_path",
            str(tiny_model), "--output_dir", str(out), "--batch_size", "2", "--gradient_accumulation_steps", "1",
            "--num_workers", "0", "--save_steps", "1", "--no-gradient_checkpointing"]
    assert finetune.main([*args, "--max_steps", "2"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # Mark the latest checkpoint's state: a resumed run carries the mark on, a restarted one would not.
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 2, "resume_marker": 1})
    state_file.write_text(json.dumps(state))
    assert finetune.main([*args, "--max_steps", "3", "--resume_from_checkpoint", "auto"]) == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["steps"] == 3
    final_state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert {"step": 2, "resume_marker": 1} in final_state["log_history"]
