"""Loading: processor fix-ups, stop tokens, LoRA applied/merged, legacy adapters, 4-bit."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import REAL_IMAGES, make_adapter, read_csv, run_in_process, run_script, tiny_args
from safetensors.torch import load_file, save_file

from jjvmed import prompts
from jjvmed.model import ModelSpec, apply_adapter, load_model, load_processor, modernize_regex, stop_token_ids

LEGACY = [
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.vision_tower.", "vision_tower."),
]


def to_legacy_name(name: str) -> str:
    head = "base_model.model." if name.startswith("base_model.model.") else ""
    rest = name[len(head):]
    for new, old in LEGACY:
        if rest.startswith(new):
            return head + old + rest[len(new):]
    return name


def write_legacy_adapter(adapter: Path, out: Path) -> Path:
    """The same adapter saved as transformers < 4.52 named LLaVA's modules (as the published one is)."""
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = sorted(to_legacy_name(t) for t in config["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file({to_legacy_name(k): v for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


def caption_rows(tiny_model: Path, out: Path, *extra: str) -> list[list[str]]:
    """The CSV of a caption run on the first 6 images, 10 tokens each."""
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, out, REAL_IMAGES, "--max_new_tokens", "10",
                                                                "--limit", "6", "--batch_size", "3", *extra))
    assert result.returncode == 0, result.stderr
    return read_csv(out)


def test_processor_gets_the_fixups_the_8b_repo_needs(tiny_model):
    assert not (tiny_model / "processor_config.json").exists()
    processor = load_processor(str(tiny_model))
    assert (processor.patch_size, processor.vision_feature_select_strategy) == (14, "default")
    assert processor.num_additional_image_tokens == 1
    assert processor.tokenizer.padding_side == "left"
    from PIL import Image

    batch = processor(text=[prompts.build_prompt("vicuna", "hola")], images=[Image.new("RGB", (50, 90))],
                      return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_token).sum()) == 576


def test_generation_stops_on_eot_as_well_as_end_of_text(tiny_model):
    from transformers import GenerationConfig

    processor = load_processor(str(tiny_model))
    config = GenerationConfig.from_pretrained(tiny_model)
    vocab = processor.tokenizer.get_vocab()
    assert config.eos_token_id == vocab["<|end_of_text|>"]  # the 8B trap: eot is not listed
    assert set(stop_token_ids(processor.tokenizer, config)) == {vocab["<|end_of_text|>"], vocab["<|eot_id|>"]}


def test_prompts_match_the_adapter_training_format_and_the_native_chat_format():
    assert prompts.build_prompt("vicuna", "¿Qué?") == "USER: <image>\n¿Qué?\nASSISTANT:"
    assert prompts.build_prompt("vicuna", "Enumera", "Los conceptos médicos clave son:") == \
        "USER: <image>\nEnumera\nASSISTANT: Los conceptos médicos clave son:"
    assert prompts.build_prompt("llama3", "Q") == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompts.resolve_template("auto", "some/adapter") == "vicuna"
    assert prompts.resolve_template("auto", None) == "llama3"


def test_lora_adapter_changes_captions_and_merged_gives_the_same_tokens(tiny_model, tiny_adapter, tmp_path):
    base = caption_rows(tiny_model, tmp_path / "base.csv", "--prompt_template", "vicuna")
    applied = caption_rows(tiny_model, tmp_path / "lora.csv", "--adapter_repo", str(tiny_adapter),
                           "--no-merge_adapters")
    merged = caption_rows(tiny_model, tmp_path / "merged.csv", "--adapter_repo", str(tiny_adapter))
    assert applied == merged
    assert sum(a != b for a, b in zip(applied[1:], base[1:], strict=True)) >= 4


def test_legacy_layout_adapter_gives_the_same_captions_as_the_modern_one(tiny_model, tiny_adapter, tmp_path):
    legacy = write_legacy_adapter(tiny_adapter, tmp_path / "legacy")
    modern = caption_rows(tiny_model, tmp_path / "modern.csv", "--adapter_repo", str(tiny_adapter))
    renamed = caption_rows(tiny_model, tmp_path / "legacy.csv", "--adapter_repo", str(legacy))
    assert renamed == modern


def test_plain_peft_silently_ignores_a_legacy_adapter_which_is_why_it_is_renamed(tiny_model, tiny_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    legacy = write_legacy_adapter(tiny_adapter, tmp_path / "legacy")
    ids = torch.tensor([[5, 6, 7, 8]])
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            naive = PeftModel.from_pretrained(base, str(legacy)).eval()
        assert torch.allclose(naive(input_ids=ids).logits, base_logits)  # PEFT matched nothing and said only a warning
        fixed = apply_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_model).eval(), legacy)
        assert not torch.allclose(fixed(input_ids=ids).logits, base_logits)


def test_regex_targets_in_the_legacy_layout_are_renamed_too():
    pattern = r".*language_model\.model\.layers\.\d+\.self_attn\.q_proj|multi_modal_projector\.linear_1"
    assert modernize_regex(pattern) == \
        r".*model\.language_model\.layers\.\d+\.self_attn\.q_proj|model\.multi_modal_projector\.linear_1"
    assert modernize_regex(r".*model\.language_model\.layers.*") == r".*model\.language_model\.layers.*"


def test_an_adapter_that_matches_no_module_is_refused(tiny_model, tiny_adapter, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((tiny_adapter / "adapter_config.json").read_text())
    weights = load_file(tiny_adapter / "adapter_model.safetensors")
    renamed = {k.replace("self_attn", "attention"): v for k, v in weights.items()}
    save_file(renamed, broken / "adapter_model.safetensors")
    result = run_in_process("generate_captions.py", *tiny_args(tiny_model, tmp_path / "c.csv", REAL_IMAGES,
                                                                "--adapter_repo", str(broken), "--limit", "1"))
    assert result.returncode == 2 and "the adapter did not apply" in result.stderr
    assert not (tmp_path / "c.csv").exists()


def test_4bit_nf4_loads_and_generates_on_cpu(tiny_model, tiny_adapter, tmp_path):
    model, _, _ = load_model(ModelSpec(str(tiny_model), None, load_in_4bit=True, device="cpu"))
    quantized = {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert any(".language_model.layers.0.self_attn.q_proj" in n for n in quantized)
    assert not any("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n for n in quantized)
    rows = caption_rows(tiny_model, tmp_path / "q.csv", "--adapter_repo", str(tiny_adapter), "--load_in_4bit")
    assert len(rows) == 7 and all(r[1] for r in rows[1:])


def test_merge_with_4bit_merges_in_full_precision_then_quantizes(tiny_model, tiny_adapter, tmp_path):
    cache = tmp_path / "merged-cache"
    rows = caption_rows(tiny_model, tmp_path / "m.csv", "--adapter_repo", str(tiny_adapter), "--load_in_4bit",
                        "--merge_adapters", "--merged_cache_dir", str(cache))
    assert len(rows) == 7 and all(r[1] for r in rows[1:])
    (merged,) = [p for p in cache.iterdir() if not p.name.startswith("merging-")]
    assert (merged / "config.json").exists()
    # The cached merge holds the LoRA update at full precision: it differs from the base weights.
    import torch

    base = load_file(tiny_model / "model.safetensors")
    merged_w = load_file(merged / "model.safetensors")
    key = next(k for k in base if "language_model" in k and "layers.0.self_attn.q_proj.weight" in k)
    assert merged_w[key].dtype == torch.float32 and not torch.equal(merged_w[key], base[key])


@pytest.mark.parametrize("as_list", [True, False])
def test_adapters_saved_with_name_lists_or_regexes_both_apply(tiny_model, tmp_path, as_list):
    import torch
    from transformers import LlavaForConditionalGeneration

    adapter = make_adapter(tiny_model, tmp_path / "a", seed=3, as_list=as_list)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = apply_adapter(model, adapter)(input_ids=ids).logits
    assert not torch.allclose(before, after)


def test_a_run_with_an_adapter_and_no_4bit_prints_nothing_from_bitsandbytes(tiny_model, tiny_adapter, tmp_path):
    """PEFT imports bitsandbytes, which announces a missing optional kernel package at import: not a word of it
    on a run that does not use bitsandbytes (a fresh interpreter: the import happens once per process)."""
    args = [*tiny_args(tiny_model, tmp_path / "c.csv"), "--adapter_repo", str(tiny_adapter), "--limit", "1"]
    result = run_script("generate_captions.py", *args)
    assert result.returncode == 0, result.stderr
    assert "kernels" not in result.stderr and "bitsandbytes" not in result.stderr
