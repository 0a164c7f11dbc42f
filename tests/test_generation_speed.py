"""The GPU speed options, checked on CPU with the tiny LLaVA: the static-cache + padding path of
--compile gives the eager text and compiles once, --batch_size auto, merged adapters by default, and
pinned batches.

The real inductor compile takes a minute or more on 2 CPU cores, so the fast tests run the compiled
path with torch.compile's "eager" backend (the same graph capture and the same recompile rules, no
code generation); one test marked `slow` runs the whole script with --compile.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REAL_IMAGES, read_csv

import generate_captions
from jjvmed import errors, generation, prompts
from jjvmed.generation import AUTO_BATCH_CAP, CPU_BATCH_SIZE, auto_batch_size, fit_batch, padded_sizes
from jjvmed.images import Batch, list_images, load_image
from jjvmed.model import ModelSpec, load_model

# Three prompts of different lengths, so every batch is left-padded.
QUESTIONS = ["Hola", "¿Cuál es la descripción o el pie de foto de esta imagen médica?", "x y z"]


def captions(tiny_model, out, *extra: str) -> int:
    argv = ["--image_dir", str(REAL_IMAGES), "--output_csv", str(out), "--base_model_path", str(tiny_model),
            "--adapter_repo", "none", "--max_new_tokens", "12", "--num_workers", "0", *extra]
    return errors.run_cli(generate_captions.main, argv)


def mixed_prompt_batches(processor, sizes: list[int]) -> list[Batch]:
    items = list_images(REAL_IMAGES)
    batches, start = [], 0
    for size in sizes:
        chunk = [items[(start + k) % len(items)] for k in range(size)]
        texts = [prompts.build_prompt("vicuna", QUESTIONS[(start + k) % 3]) for k in range(size)]
        inputs = processor(text=texts, images=[load_image(p) for _, p in chunk], return_tensors="pt", padding=True)
        batches.append(Batch([f"{i}#{start + k}" for k, (i, _) in enumerate(chunk)], dict(inputs), []))
        start += size
    return batches


@pytest.fixture(scope="module")
def bundle(tiny_model):
    return load_model(ModelSpec(str(tiny_model), None, device="cpu"))


def texts(model, processor, batches, **kwargs) -> dict[str, str]:
    gen = {"max_new_tokens": 12, "do_sample": False, "num_beams": 1}
    records = generation.generate_batches(model, processor, batches, gen, **kwargs)
    return {r.id: r.text for batch in records for r in batch}


def test_compiled_path_gives_the_eager_text_and_compiles_once_when_the_last_batch_is_short(bundle):
    import torch._dynamo

    model, processor, _ = bundle
    batches = mixed_prompt_batches(processor, [6, 6, 3])  # a run of 15 images at batch size 6
    assert len({int(m.sum()) for b in batches for m in b.inputs["attention_mask"]}) == 3  # left padding happens
    eager = texts(model, processor, batches)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = texts(model, processor, batches, compile_backend="eager", batch_size=6)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled == eager
    assert len(eager) == 15 and len(set(eager.values())) > 3
    assert graphs == 1  # the batch of 3 was padded to 6, not to 4: no second compile


def test_compiled_batches_after_an_out_of_memory_are_run_at_powers_of_two():
    assert padded_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert padded_sizes(32) == [1, 2, 4, 8, 16, 32]


def test_batch_size_auto_on_cpu_is_the_cpu_default_and_never_more_than_the_images(bundle):
    model, processor, _ = bundle
    gen = {"max_new_tokens": 4}
    assert auto_batch_size(model, processor, "USER: <image>\nx\nASSISTANT:", gen, 1000, False).size == CPU_BATCH_SIZE
    assert auto_batch_size(model, processor, "USER: <image>\nx\nASSISTANT:", gen, 3, False).size == 3


def test_auto_batch_fit_keeps_the_margin_of_free_memory_on_every_gpu():
    gib = 2**30
    # 2 GiB fixed + 1 GiB per image on GPU 0; 1 GiB fixed + 0.5 GiB per image on GPU 1.
    peaks = [(4, {0: 6 * gib, 1: 3 * gib}), (8, {0: 10 * gib, 1: 5 * gib})]
    assert fit_batch(peaks, {0: 20 * gib, 1: 100 * gib}, 0.8) == 14  # (16 - 2) / 1 on GPU 0
    assert fit_batch(peaks, {0: 100 * gib, 1: 10 * gib}, 0.8) == 14  # (8 - 1) / 0.5 on GPU 1
    # One probe: its whole peak counts as per-image, so the estimate errs small.
    assert fit_batch(peaks[:1], {0: 20 * gib, 1: 100 * gib}, 0.8) == 10
    assert fit_batch([(1, {0: 0})], {0: gib}, 0.8) == AUTO_BATCH_CAP


def test_auto_batch_size_gives_the_csv_of_batch_one_and_says_what_it_chose(tiny_model, tmp_path, capsys):
    assert captions(tiny_model, tmp_path / "b1.csv", "--batch_size", "1", "--limit", "10") == 0
    capsys.readouterr()
    assert captions(tiny_model, tmp_path / "auto.csv", "--limit", "10") == 0  # the default is auto
    assert f"batch size {min(CPU_BATCH_SIZE, 10)} (auto)" in capsys.readouterr().err
    assert read_csv(tmp_path / "b1.csv") == read_csv(tmp_path / "auto.csv")


def test_resume_with_another_batch_size_is_accepted(tiny_model, tmp_path):
    out = tmp_path / "c.csv"
    assert captions(tiny_model, out, "--limit", "3", "--batch_size", "1") == 0
    assert captions(tiny_model, out, "--limit", "6", "--batch_size", "auto", "--resume_from_checkpoint", "auto") == 0
    assert captions(tiny_model, tmp_path / "fresh.csv", "--limit", "6", "--batch_size", "5") == 0
    assert read_csv(out) == read_csv(tmp_path / "fresh.csv")


def journal_settings(out) -> dict:
    with open(out.with_name(f"{out.stem}.journal.jsonl"), encoding="utf-8") as fh:
        return json.loads(fh.readline())["settings"]


def test_adapters_are_merged_by_default_and_resuming_an_unmerged_journal_is_refused(tiny_model, tiny_adapter,
                                                                                      tmp_path, capsys):
    out = tmp_path / "c.csv"
    adapter = ["--adapter_repo", str(tiny_adapter), "--limit", "2"]
    assert captions(tiny_model, out, *adapter, "--no-merge_adapters") == 0
    assert journal_settings(out)["merge_adapters"] is False
    capsys.readouterr()
    assert captions(tiny_model, out, *adapter, "--limit", "4", "--resume_from_checkpoint", "auto") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "merge_adapters" in err
    assert captions(tiny_model, out, *adapter, "--limit", "4", "--resume_from_checkpoint", "auto",
                    "--no-merge_adapters") == 0
    merged = tmp_path / "m.csv"
    assert captions(tiny_model, merged, *adapter) == 0
    assert journal_settings(merged)["merge_adapters"] is True


def test_merge_default_follows_the_adapter_and_4bit():
    from jjvmed.model import merge_by_default

    assert merge_by_default("some/adapter", load_in_4bit=False) is True
    assert merge_by_default("some/adapter", load_in_4bit=True) is False
    assert merge_by_default(None, load_in_4bit=False) is False


def test_the_loaders_pinning_step_reaches_the_batch_tensors(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = Batch(["a", "b"], {"input_ids": torch.ones(2, 5, dtype=torch.long),
                               "pixel_values": torch.zeros(2, 3, 4, 4)}, [("c", "broken")])
    if not torch.cuda.is_available():
        # Pinning itself needs a GPU; here every tensor's pin step is recorded instead. Before Batch had
        # pin_memory() the loader handed the batch back untouched and no tensor was ever pinned.
        pinned_ids = []
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned_ids.append(id(self)) or self)
    pinned = pin_memory(batch)
    assert isinstance(pinned, Batch) and pinned.ids == batch.ids and pinned.failures == batch.failures
    assert all(torch.equal(pinned.inputs[k], batch.inputs[k]) for k in batch.inputs)
    if torch.cuda.is_available():
        assert all(v.is_pinned() for v in pinned.inputs.values())
    else:
        assert sorted(pinned_ids) == sorted(id(v) for v in batch.inputs.values())


def test_a_batch_of_failed_images_passes_the_pinning_step():
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = Batch([], None, [("a", "cannot identify image file")])
    assert pin_memory(batch) == batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_engine_loader_pins_its_batches_on_cuda(tiny_model):
    from jjvmed.images import make_loader
    from jjvmed.model import load_processor

    processor = load_processor(str(tiny_model))
    loader = make_loader(list_images(REAL_IMAGES)[:4], processor, "USER: <image>\nx\nASSISTANT:", 2, 0,
                         pin_memory=True)
    assert all(v.is_pinned() for batch in loader for v in batch.inputs.values())


@pytest.mark.slow
def test_compile_with_inductor_writes_the_eager_csv(tiny_model, tmp_path, capsys):
    """The whole script with --compile (inductor, about a minute on 2 cores) against the eager run."""
    assert captions(tiny_model, tmp_path / "eager.csv", "--batch_size", "4", "--limit", "6") == 0
    capsys.readouterr()
    assert captions(tiny_model, tmp_path / "compiled.csv", "--batch_size", "4", "--limit", "6", "--compile") == 0
    assert "compiled" in capsys.readouterr().err
    assert read_csv(tmp_path / "eager.csv") == read_csv(tmp_path / "compiled.csv")
