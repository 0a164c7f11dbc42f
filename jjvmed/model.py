"""Getting a ready model: device and dtype, processor fix-ups and stop tokens, 4-bit, the LoRA
adapter (legacy renaming, verification, merging, the merged cache). `load_model` returns the model,
its processor and the device inputs go to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, first_line, log, quiet_library_deprecations, quiet_unused_bitsandbytes

DEFAULT_BASE_MODEL = "xtuner/llava-llama-3-8b-v1_1-transformers"
DEFAULT_ADAPTER = "JoVal26/ja-med-clef-model"
# The 8B generation config lists only <|end_of_text|>; the model ends its turns with <|eot_id|>.
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")
IMAGE_BACKEND = "pil"  # transformers' image processors: the same pixels on every machine (load_processor)

@dataclass
class ModelSpec:
    base_model_path: str = DEFAULT_BASE_MODEL
    adapter: str | None = DEFAULT_ADAPTER  # None runs the base model
    lora_subfolder: str | None = None
    merge_adapters: bool = False
    load_in_4bit: bool = False
    device: str = "auto"  # auto | cuda | cpu | cuda:N
    dtype: str = "auto"
    merged_cache_dir: str | None = None


def merge_by_default(adapter: str | None, load_in_4bit: bool) -> bool:
    """Whether --merge_adapters is on when not given: merged, unless there is no adapter or the model is 4-bit.

    Unmerged, PEFT runs the LoRA branch of all 224 adapted layers at every decoding step (~900 small
    extra operations): on a CPU stand-in with the 8B's 32 layers, a decoding step took about twice as
    long (benchmarks/adapter_merge.py; README, Throughput). With 4-bit weights a merge means merging
    unquantized weights on the CPU and saving ~16 GB once, so there it stays a choice.
    """
    return adapter is not None and not load_in_4bit


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; a CUDA device asked for without one is a UserError."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


def target_device(device_map) -> str:
    """The one device a model placed whole goes to: the device map's, or the current GPU for 'auto'."""
    import torch

    return device_map.get("") if isinstance(device_map, dict) else f"cuda:{torch.cuda.current_device()}"


def resolve_device_and_dtype(device: str, dtype: str):
    """(device_map for from_pretrained, torch dtype)."""
    import torch

    cuda = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    if device == "auto":
        device = "cuda" if cuda else "cpu"
        device_map: Any = "auto" if cuda else {"": "cpu"}
    elif device == "cuda":
        device_map = {"": f"cuda:{torch.cuda.current_device()}"}
    else:
        device_map = {"": device}
    if dtype == "auto":
        if device.startswith("cuda"):
            torch_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            torch_dtype = torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    return device_map, torch_dtype


def fix_processor(processor) -> None:
    """The 8B repo ships no processor_config.json; transformers 5 then lacks patch_size and fails."""
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = 14
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = "default"
    if not getattr(processor, "num_additional_image_tokens", 0):
        processor.num_additional_image_tokens = 1  # CLIP's CLS token
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = "<pad>" if "<pad>" in tok.get_vocab() else tok.eos_token
    tok.padding_side = "left"  # decoder-only generation continues from the right end


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """eos of the generation config plus <|eot_id|> and <|end_of_text|>: the 8B config lists only the latter."""
    ids: list[int] = []
    eos = generation_config.eos_token_id
    ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in STOP_TOKENS if t in vocab)
    return list(dict.fromkeys(ids))


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` is a hub ID; anything else (absolute, relative, deeper paths) is a local folder."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith("/")


def check_model_source(name: str, what: str) -> None:
    """Fail in a second, with a line saying what to do, where loading would fail after minutes.

    A local folder must exist. A hub ID must be in the local cache, or the hub must be reachable:
    offline, the hub client retries for minutes before its error.
    """
    if Path(name).expanduser().exists():
        return
    if not looks_like_hub_id(name):
        raise UserError(f"{what} {name}: no such folder")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json" if what == "--base_model_path" else "adapter_config.json")
    if isinstance(cached, str):
        return
    hint = "download it once where there is network (README: Running offline) and give the local folder"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{what} {name} is not in the local cache and HF_HUB_OFFLINE is set; {hint}")
    import socket
    from urllib.parse import urlparse

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(f"{what} {name} is not in the local cache and {host} cannot be reached; {hint}") from None


def load_processor(base_model_path: str):
    """The LLaVA processor, with transformers' PIL image processor wherever it runs.

    Left to itself, transformers 5 takes its torchvision image processor where torchvision is installed
    (GPU machines) and the PIL one elsewhere (this project's CPU machines): their resizing differs, so an
    index embedded on one would be queried with other pixels on the other. PIL is what the hf: encoders
    use too. The image processor is loaded on its own: `backend=` given to AutoProcessor would also reach
    the tokenizer, which keeps it as its own `backend` attribute.
    """
    from transformers import AutoImageProcessor, AutoProcessor

    check_model_source(base_model_path, "--base_model_path")
    try:
        processor = AutoProcessor.from_pretrained(base_model_path)
        processor.image_processor = AutoImageProcessor.from_pretrained(base_model_path, backend=IMAGE_BACKEND)
    except OSError as e:
        raise UserError(f"cannot load the processor from {base_model_path}: {first_line(e)}") from None
    fix_processor(processor)
    return processor


def quantization_config(torch_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype,
        # The vision tower and projector are small and sensitive; keep them (and lm_head) unquantized.
        # transformers 5 matches these from the start of the module name.
        llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    )


def load_base_model(path: str, device_map, torch_dtype, load_in_4bit: bool):
    from transformers import LlavaForConditionalGeneration

    from . import attention

    # SDPA, with decoding steps attending per KV head instead of on a 4x copy of the KV cache (attention.py).
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": device_map,
                              "attn_implementation": attention.register()}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(torch_dtype)
    try:
        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load the model from {path}: {first_line(e)}") from None


def load_model(spec: ModelSpec):
    """(model in eval mode, processor, device that inputs go to) for a ModelSpec."""
    if not spec.load_in_4bit:
        quiet_unused_bitsandbytes()
    device_map, torch_dtype = resolve_device_and_dtype(spec.device, spec.dtype)
    processor = load_processor(spec.base_model_path)
    adapter_dir = resolve_adapter(spec.adapter, spec.lora_subfolder) if spec.adapter else None
    if adapter_dir and spec.merge_adapters and spec.load_in_4bit:
        # Merging LoRA into 4-bit weights would round the update away; merge into unquantized weights,
        # save once, then quantize that merged model.
        merged = merged_model_dir(spec, adapter_dir, torch_dtype)
        model = load_base_model(str(merged), device_map, torch_dtype, load_in_4bit=True)
    else:
        model = load_base_model(spec.base_model_path, device_map, torch_dtype, spec.load_in_4bit)
        if adapter_dir:
            model = apply_adapter(model, adapter_dir)
            if spec.merge_adapters:
                model = model.merge_and_unload()
    model.eval()
    return model, processor, input_device(model)


def input_device(model):
    import torch

    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def merged_model_dir(spec: ModelSpec, adapter_dir: Path, torch_dtype) -> Path:
    """Merge the adapter into an unquantized (bf16/fp16/fp32) copy of the base model once and cache it on disk."""
    key = hashlib.sha256(f"{spec.base_model_path}|{adapter_dir_fingerprint(adapter_dir)}|{torch_dtype}".encode())
    root = Path(spec.merged_cache_dir or Path.home() / ".cache" / "jj-vmed" / "merged")
    out = root / key.hexdigest()[:16]
    if (out / "config.json").exists():
        return out
    log(f"merging the adapter into unquantized weights in {out} (once; later runs reuse it)")
    model = load_base_model(spec.base_model_path, {"": "cpu"}, torch_dtype, load_in_4bit=False)
    model = apply_adapter(model, adapter_dir).merge_and_unload()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix="merging-"))  # same filesystem, so the rename is atomic
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def adapter_dir_fingerprint(adapter_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(adapter_dir.glob("adapter_*")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def resolve_adapter(adapter: str, subfolder: str | None) -> Path:
    """Local folder of the adapter: a local path as is, a hub ID downloaded (or read from the cache)."""
    local = Path(adapter)
    if not local.exists():
        from huggingface_hub import snapshot_download

        check_model_source(adapter, "--adapter_repo")
        try:
            local = Path(snapshot_download(adapter, allow_patterns=[f"{subfolder}/*" if subfolder else "*"]))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: all the user's to fix
            raise UserError(f"cannot get the adapter {adapter!r} (a local folder or hub ID): {first_line(e)}") from None
    folder = local / subfolder if subfolder else local
    if not (folder / "adapter_config.json").exists():
        raise UserError(f"no adapter_config.json in {folder}; is --adapter_repo/--lora_subfolder right?")
    return folder


# transformers < 4.52 named LLaVA's modules without the inner `model.`; adapters trained then
# (the published one among them) must be renamed or PEFT silently matches nothing.
LEGACY_PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("vision_tower.", "model.vision_tower."),
]


def modernize_module_name(name: str) -> str:
    """Rename one pre-4.52 module path (possibly under PEFT's `base_model.model.`) to the 5.x layout."""
    head = "base_model.model." if name.startswith("base_model.model.") else ""
    rest = name[len(head):]
    for old, new in LEGACY_PREFIXES:
        if rest.startswith(old):
            return head + new + rest[len(old):]
    return name


def modernize_regex(pattern: str) -> str:
    """The same renaming inside a target_modules regex (dots escaped or not)."""
    for old, new in LEGACY_PREFIXES:
        for o, n in ((old, new), (re.escape(old), re.escape(new))):
            pattern = re.sub(rf"(?<![\w.\\]){re.escape(o)}", n.replace("\\", "\\\\"), pattern)
    return pattern


def is_legacy_adapter(config: dict, keys: Iterable[str]) -> bool:
    targets = config.get("target_modules") or []
    names = [targets] if isinstance(targets, str) else list(targets)
    names += [k.removeprefix("base_model.model.") for k in keys]
    return any(re.search(r"(^|[^.\w])language_model(\\?\.)model(\\?\.)|(^|\^)multi_modal_projector", n)
               or n.startswith(("language_model.", "multi_modal_projector.", "vision_tower."))
               for n in names)


def read_adapter_weights(adapter_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        return load_file(st)
    binary = adapter_dir / "adapter_model.bin"
    if binary.exists():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise UserError(f"no adapter_model.safetensors or adapter_model.bin in {adapter_dir}")


def modernize_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Write a copy of a pre-4.52 adapter with its config targets and weight keys renamed."""
    from safetensors.torch import save_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    if isinstance(targets, str):
        config["target_modules"] = modernize_regex(targets)
    elif targets:
        config["target_modules"] = [modernize_module_name(t) for t in targets]
    if isinstance(config.get("modules_to_save"), list):
        config["modules_to_save"] = [modernize_module_name(t) for t in config["modules_to_save"]]
    weights = {modernize_module_name(k): v.contiguous() for k, v in read_adapter_weights(adapter_dir).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, out_dir / "adapter_model.safetensors")
    return out_dir


def apply_adapter(model, adapter_dir: Path):
    """Wrap the model with the LoRA adapter and prove every saved weight landed in the model."""
    from peft import PeftModel

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = read_adapter_weights(adapter_dir)
    if is_legacy_adapter(config, weights):
        log("adapter uses the pre-4.52 LLaVA module names; renaming them for transformers 5")
        adapter_dir = modernize_adapter(adapter_dir, Path(tempfile.mkdtemp(prefix="jj-vmed-adapter-")))
        weights = read_adapter_weights(adapter_dir)
    try:
        with quiet_library_deprecations():
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except ValueError as e:
        raise UserError(f"the adapter in {adapter_dir} does not fit this base model: {first_line(e)}") from None
    check_adapter_loaded(peft_model, weights)
    return peft_model


def check_adapter_loaded(peft_model, saved: dict) -> None:
    """Fail loudly if any saved LoRA tensor is absent from the model or was not copied into it.

    PEFT only warns when saved keys match no module, and the LoRA weights then stay at their zero
    start: the model silently behaves like the base model.
    """
    import torch

    state = peft_model.state_dict()
    missing = []
    for key, value in saved.items():
        name = re.sub(r"\.(weight|bias)$", r".default.\1", key)
        target = state.get(name, state.get(key))
        if target is None or target.shape != value.shape or not torch.equal(target.cpu().to(value.dtype), value):
            missing.append(key)
    if missing or not saved:
        raise UserError(
            f"the adapter did not apply: {len(missing)} of {len(saved)} saved LoRA tensors match no module of "
            f"the base model (first: {missing[0] if missing else 'none saved'}); wrong base model or adapter?"
        )
