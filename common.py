"""The JJ-VMed engine shared by generate_captions.py and generate_concepts.py.

Data flows one way:
    image folder -> ImageDataset -> DataLoader (decode + preprocess in workers) -> model.generate
    -> raw text -> Journal (append-only JSONL) -> task post-processing -> CSV written atomically.

Each step is a plain function or a small class with explicit inputs, so the entry scripts own only
their task: arguments, prompt, post-processing and output columns. torch and transformers are
imported inside the functions that need them, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASE_MODEL = "xtuner/llava-llama-3-8b-v1_1-transformers"
DEFAULT_ADAPTER = "JoVal26/ja-med-clef-model"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
JOURNAL_VERSION = 1


class UserError(Exception):
    """A problem the user must fix (bad path, bad flag, mismatching resume): one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# Prompts, kept as data. `vicuna` is the adapter's training format; `llama3` is the base model's
# native chat format. The tokenizer adds <|begin_of_text|> itself.
# ---------------------------------------------------------------------------------------------

PROMPT_TEMPLATES = {
    "vicuna": "USER: <image>\n{instruction}\nASSISTANT:{prefill}",
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{instruction}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{prefill}"
    ),
}

# (task, language) -> instruction. The Spanish ones are the adapter's exact training instructions.
INSTRUCTIONS = {
    ("caption", "es"): "¿Cuál es la descripción o el pie de foto de esta imagen médica?",
    ("caption", "en"): "What is the caption of this medical image?",
    ("concepts", "es"): "Enumera los conceptos médicos clave (CUIs) observados o inferidos en esta imagen.",
    ("concepts", "en"): "List the key medical concepts (CUIs) observed or inferred in this image.",
}

# The opening of the trained answer. Concept prompts end with it so the model goes straight into
# the list. Training answers followed "ASSISTANT:" after one space, so the prefill keeps that space.
ANSWER_PREFIXES = {
    ("concepts", "es"): "Los conceptos médicos clave son:",
    ("concepts", "en"): "The key medical concepts are:",
}

STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")


def build_prompt(template: str, instruction: str, prefill: str = "") -> str:
    """The full prompt for one image; `prefill` is text the answer is forced to start with."""
    if template not in PROMPT_TEMPLATES:
        raise UserError(f"unknown prompt template {template!r}; choose from {sorted(PROMPT_TEMPLATES)}")
    if prefill and template == "vicuna":
        prefill = " " + prefill
    return PROMPT_TEMPLATES[template].format(instruction=instruction, prefill=prefill)


def resolve_template(template: str, adapter: str | None) -> str:
    """`auto` = the adapter's training format when an adapter is loaded, else the native one."""
    if template != "auto":
        return template
    return "vicuna" if adapter else "llama3"


# ---------------------------------------------------------------------------------------------
# Command line: options shared by both scripts, grouped by purpose.
# ---------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, task: str, max_new_tokens: int) -> None:
    """Add every option both generate scripts share. `task` picks the defaults."""
    default_out = "results/captions.csv" if task == "caption" else "results/concepts.csv"
    io = parser.add_argument_group("input and output")
    io.add_argument("--image_dir", help="folder of images (jpg, jpeg, png, bmp, gif, tif, tiff, webp); "
                    "the image ID is the file name without its extension")
    io.add_argument("--output_csv", default=default_out, help="final CSV (default: %(default)s)")
    io.add_argument("--limit", type=int, default=None, help="process only the first N images (a quick trial run)")

    ck = parser.add_argument_group("checkpoint and resume")
    ck.add_argument("--checkpoint_dir", default=None,
                    help="folder for the journal of raw generations (default: beside --output_csv)")
    ck.add_argument("--checkpoint_interval", type=int, default=1,
                    help="fsync the journal every N batches; records are appended after every batch "
                    "(default: %(default)s)")
    ck.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|auto",
                    help="continue a killed run: 'auto' uses the journal beside the output (starts fresh "
                    "if there is none), or give a journal path")
    ck.add_argument("--force_resume", action="store_true",
                    help="resume even if the journal was written with different settings")
    ck.add_argument("--overwrite", action="store_true", help="discard an existing journal and start over")

    model = parser.add_argument_group("model")
    model.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL,
                       help="hub ID or local folder of the LLaVA model (default: %(default)s)")
    model.add_argument("--adapter_repo", default=DEFAULT_ADAPTER,
                       help="hub ID or local folder of the LoRA adapter; 'none' runs the base model "
                       "(default: %(default)s)")
    model.add_argument("--lora_subfolder", default=None, help="subfolder of the adapter repo holding the adapter")
    model.add_argument("--merge_adapters", action="store_true",
                       help="merge the LoRA weights into the base model (faster generation); with "
                       "--load_in_4bit the merge is done on unquantized weights, saved, then quantized")
    model.add_argument("--merged_cache_dir", default=None,
                       help="where merged unquantized models are kept for --merge_adapters --load_in_4bit "
                       "(default: ~/.cache/jj-vmed/merged)")
    model.add_argument("--load_in_4bit", action="store_true",
                       help="4-bit NF4 quantization with bitsandbytes (about 6 GB of GPU memory for the 8B model)")
    model.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                       help="auto: spread over all visible GPUs (device_map='auto') if CUDA is present, else CPU "
                       "(default: %(default)s)")
    model.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                       help="weights dtype; auto = bfloat16 on GPUs that support it, float16 on older ones, "
                       "float32 on CPU (default: %(default)s)")

    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--prompt_template", choices=["auto", *PROMPT_TEMPLATES], default="auto",
                        help="auto = vicuna (the adapter's training format) with an adapter, llama3 without "
                        "(default: %(default)s)")
    prompt.add_argument("--language", choices=["es", "en"], default="es",
                        help="language of the built-in instruction; es is what the adapter was trained on "
                        "(default: %(default)s)")
    prompt.add_argument("--prompt", default=None, help="your own instruction instead of the built-in one")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--batch_size", type=int, default=4,
                     help="images per generate call; halved automatically on CUDA out-of-memory (default: %(default)s)")
    gen.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                     help="longest answer in tokens (default: %(default)s)")
    gen.add_argument("--generation_kwargs", default=None, metavar="JSON",
                     help='extra generate() settings merged over the greedy defaults, e.g. '
                     '\'{"num_beams": 3, "repetition_penalty": 1.1}\'')
    gen.add_argument("--seed", type=int, default=0, help="random seed, for sampling (default: %(default)s)")
    scale = parser.add_argument_group("scale-out (see README: several GPUs and machines)")
    scale.add_argument("--num_shards", type=int, default=None,
                       help="without a launcher (job arrays): split the sorted images into N shards ...")
    scale.add_argument("--shard_index", type=int, default=None, help="... and process shard i (0-based)")
    scale.add_argument("--merge_shards", action="store_true",
                       help="build the final CSVs from all shards' journals (no model needed); refuses if a shard "
                       "is missing or incomplete")
    gen.add_argument("--num_workers", type=int, default=None,
                     help="processes decoding images while the model generates; 0 decodes in the main process "
                     "(default: 4 with a GPU, half the cores on CPU, where the model gets the other half)")


def parse_generation_kwargs(text: str | None, max_new_tokens: int) -> dict[str, Any]:
    """Greedy defaults with the user's JSON merged over them; unknown keys are refused."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if not text:
        return kwargs
    try:
        user = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--generation_kwargs is not valid JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(user, dict):
        raise UserError(f"--generation_kwargs must be a JSON object like '{{\"num_beams\": 3}}', got: {text}")
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict())
    unknown = sorted(k for k in user if k not in known)
    if unknown:
        raise UserError(f"--generation_kwargs has unknown generate() settings: {', '.join(unknown)}")
    kwargs.update(user)
    return kwargs


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


DIGIT_RUNS = re.compile(r"(\d+)")


def id_sort_key(image_id: str) -> tuple:
    """Natural order, so `..._test_2` comes before `..._test_10` (the 2025 IDs are not zero-padded)."""
    parts = DIGIT_RUNS.split(image_id)  # text, digits, text, digits, ..., text
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def list_images(image_dir: str | Path) -> list[tuple[str, str]]:
    """(ID, path) for every image file in the folder, in ID order. Two files with one ID is an error."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserError(f"--image_dir {folder} is not a folder")
    found: dict[str, str] = {}
    # os.scandir and plain strings: pathlib costs ~40 us a file, most of a resume over 20,000 images.
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or not stem or f".{ext.lower()}" not in IMAGE_EXTENSIONS or not entry.is_file():
                continue
            if stem in found:
                other = os.path.basename(found[stem])
                raise UserError(f"two images have the ID {stem!r}: {other} and {entry.name}")
            found[stem] = entry.path
    if not found:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return sorted(found.items(), key=lambda item: id_sort_key(item[0]))


def load_image(path: str | Path):
    """Open any common medical/figure image as 8-bit RGB, upright, alpha flattened onto white."""
    import numpy as np
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = 400_000_000  # whole-slide-like figures are legitimate input
    with Image.open(path) as img:
        img.seek(0)  # first frame of animated GIF / multi-page TIFF
        img.load()  # decode now, so a truncated file fails here and not in a worker later
        # Copies of a full-resolution scan cost as much as decoding it: only transpose/convert when needed.
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # 16-bit and float images (DICOM exports): stretch the used range to 0..255.
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return img if img.mode == "RGB" else img.convert("RGB")


class ImageDataset:
    """Map-style dataset of (ID, image or None, error message or None); never raises on bad files."""

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_id, path = self.items[index]
        try:
            return image_id, load_image(path), None
        except Exception as e:  # noqa: BLE001 - any decoding failure is reported per image
            return image_id, None, f"{type(e).__name__}: {e}".strip()


@dataclass
class Batch:
    ids: list[str]  # images that decoded and are in `inputs`, in row order
    inputs: dict | None  # processor output (input_ids, attention_mask, pixel_values) or None
    failures: list[tuple[str, str]]  # (ID, error) for images that could not be read


class Collate:
    """Runs the processor in the DataLoader workers, so preprocessing overlaps generation."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.prompt = prompt

    def process(self, images: list) -> dict:
        out = self.processor(text=[self.prompt] * len(images), images=images, return_tensors="pt", padding=True)
        return dict(out)

    def __call__(self, samples: list) -> Batch:
        good = [(i, img) for i, img, err in samples if err is None]
        failures = [(i, err) for i, _, err in samples if err is not None]
        if not good:
            return Batch([], None, failures)
        try:
            return Batch([i for i, _ in good], self.process([img for _, img in good]), failures)
        except Exception:  # noqa: BLE001 - find the image the processor cannot take, keep the others
            kept = []
            for image_id, img in good:
                try:
                    self.process([img])
                    kept.append((image_id, img))
                except Exception as e:  # noqa: BLE001
                    failures.append((image_id, f"preprocessing failed: {type(e).__name__}: {e}"))
            inputs = self.process([img for _, img in kept]) if kept else None
            return Batch([i for i, _ in kept], inputs, failures)


def make_loader(items: list[tuple[str, str]], processor, prompt: str, batch_size: int, num_workers: int,
                pin_memory: bool = False):
    from torch.utils.data import DataLoader

    return DataLoader(
        ImageDataset(items),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=Collate(processor, prompt),
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------


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


def resolve_device_and_dtype(device: str, dtype: str):
    """(device_map for from_pretrained, torch dtype, the device that inputs go to)."""
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


def load_processor(base_model_path: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(base_model_path)
    except OSError as e:
        raise UserError(f"cannot load the processor from {base_model_path}: {first_line(e)}") from None
    fix_processor(processor)
    return processor


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": device_map, "attn_implementation": "sdpa"}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(torch_dtype)
    try:
        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load the model from {path}: {first_line(e)}") from None


def load_model(spec: ModelSpec):
    """(model in eval mode, processor, device that inputs go to) for a ModelSpec."""
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


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def generate_texts(model, tokenizer, inputs: dict, device, gen_kwargs: dict, stop_ids: list[int]) -> list[str]:
    """Generate for one preprocessed batch and decode only the new tokens."""
    import torch

    moved = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**moved, **gen_kwargs, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[:, moved["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def slice_inputs(inputs: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in inputs.items()}


def generate_with_backoff(generate: Callable[[dict], list[str]], inputs: dict, n: int) -> list[str | Exception]:
    """Run `generate`; on CUDA out-of-memory halve the batch and retry the same images, down to 1.

    An image that fails even alone gets its exception in place of its text; nothing is skipped.
    """
    import torch

    try:
        return list(generate(inputs))
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        if n == 1:
            return [e]
    half = (n + 1) // 2
    log(f"CUDA out of memory at batch size {n}; retrying as {half} + {n - half}")
    return (generate_with_backoff(generate, slice_inputs(inputs, 0, half), half)
            + generate_with_backoff(generate, slice_inputs(inputs, half, n), n - half))


# ---------------------------------------------------------------------------------------------
# Journal: append-only JSONL of raw generations, the single source of truth for the CSVs.
# ---------------------------------------------------------------------------------------------


def default_journal_path(output_csv: str | Path, checkpoint_dir: str | None, suffix: str = "") -> Path:
    out = Path(output_csv)
    folder = Path(checkpoint_dir) if checkpoint_dir else out.parent
    return folder / f"{out.stem}{suffix}.journal.jsonl"


def read_journal(path: Path) -> tuple[dict, dict[str, dict], int]:
    """(header, last record per ID, byte length of the intact part). A torn last line is ignored."""
    header: dict | None = None
    records: dict[str, dict] = {}
    good_bytes = 0
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if not raw.strip():
            good_bytes += len(raw) + (0 if is_last else 1)
            continue
        try:
            entry = json.loads(raw)
            if is_last:
                raise ValueError("no newline: the write was cut off")
        except ValueError:
            if is_last:
                break  # torn tail of a killed run; it is cut off before appending
            raise UserError(f"checkpoint journal {path} is damaged at line {number}; move it away to start over") \
                from None
        if header is None:
            if entry.get("journal") != "jj-vmed":
                raise UserError(f"{path} is not a JJ-VMed checkpoint journal")
            header = entry
        else:
            records[entry["id"]] = entry
        good_bytes += len(raw) + 1
    if header is None:
        raise UserError(f"checkpoint journal {path} is empty; delete it to start over")
    return header, records, good_bytes


def settings_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Journal:
    """Appends one JSON line per image after every batch; fsyncs every `sync_every` batches."""

    def __init__(self, path: Path, settings: dict, records: dict[str, dict], keep_bytes: int | None,
                 sync_every: int = 1):
        self.path = path
        self.records = records
        self.sync_every = sync_every
        self.batches = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_bytes is None:  # new journal
            self.fh = open(path, "wb")
            self.fh.write(json_line({"journal": "jj-vmed", "version": JOURNAL_VERSION, "settings": settings,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            self.sync()
        else:
            self.fh = open(path, "r+b")
            self.fh.truncate(keep_bytes)  # drop a torn last line so new lines start clean
            self.fh.seek(keep_bytes)

    def append(self, entries: list[dict]) -> None:
        if not entries:
            return
        self.fh.write(b"".join(json_line(e) for e in entries))
        self.fh.flush()
        for e in entries:
            self.records[e["id"]] = e
        self.batches += 1
        if self.batches % self.sync_every == 0:
            os.fsync(self.fh.fileno())

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        if not self.fh.closed:
            self.sync()
            self.fh.close()


def json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def open_journal(path: Path, settings: dict, resume: str | None, force_resume: bool, overwrite: bool,
                 sync_every: int, explicit: bool) -> Journal:
    """Start or continue a journal, refusing anything that could mix two different runs."""
    if path.exists() and not overwrite:
        header, records, keep = read_journal(path)
        if resume is None:
            raise UserError(
                f"a checkpoint journal from an earlier run exists at {path} ({len(records)} images done); "
                "add --resume_from_checkpoint auto to continue it, or --overwrite to start over"
            )
        diffs = settings_differences(header.get("settings", {}), settings)
        if diffs and not force_resume:
            raise UserError(
                f"cannot resume from {path}: it was written with other settings ({'; '.join(diffs)}); "
                "use the same settings, --force_resume to continue anyway, or --overwrite to start over"
            )
        log(f"resuming from {path}: {sum(1 for r in records.values() if r.get('error') is None)} images already done")
        return Journal(path, settings, records, keep, sync_every)
    if resume is not None and explicit and not overwrite:
        raise UserError(f"--resume_from_checkpoint {path}: no such journal")
    if resume == "auto":
        log(f"no checkpoint journal at {path}; starting fresh")
    return Journal(path, settings, {}, None, sync_every)


# ---------------------------------------------------------------------------------------------
# The run: everything between the image folder and the journal.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One share of the sorted image IDs: every `count`-th image from `index` on."""

    index: int
    count: int
    distributed: bool = False  # started by torchrun/accelerate: coordinated through torch.distributed

    @property
    def suffix(self) -> str:
        return f".shard-{self.index:05d}-of-{self.count:05d}"

    def take(self, items: list) -> list:
        return items[self.index::self.count]


def shard_from(num_shards: int | None, shard_index: int | None, merge: bool = False) -> Shard | None:
    """The launcher's RANK/WORLD_SIZE if there is one, else --num_shards/--shard_index, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if num_shards is not None or merge:
            raise UserError("under torchrun the processes are the shards: drop --num_shards/--merge_shards")
        return Shard(int(os.environ["RANK"]), world, distributed=True)
    if merge:
        return None
    if num_shards is None:
        if shard_index is not None:
            raise UserError("--shard_index needs --num_shards")
        return None
    if num_shards < 1 or shard_index is None or not 0 <= shard_index < num_shards:
        raise UserError(f"--num_shards {num_shards} needs --shard_index between 0 and {max(num_shards, 1) - 1}")
    return Shard(shard_index, num_shards)


@dataclass
class RunConfig:
    task: str  # caption | concepts
    image_dir: str
    output_csv: str
    model: ModelSpec
    prompt: str  # the full prompt text, <image> included
    gen_kwargs: dict
    batch_size: int = 4
    num_workers: int | None = None  # None: auto, see cpu_split()
    seed: int = 0
    limit: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 1
    resume: str | None = None
    force_resume: bool = False
    overwrite: bool = False
    journal_path: Path | None = None  # set from resume/checkpoint_dir when None
    settings_extra: dict = field(default_factory=dict)
    shard: Shard | None = None

    def settings(self) -> dict:
        """What decides the generated text; a resume with different settings is refused."""
        m = asdict(self.model)
        for transient in ("device", "merged_cache_dir"):
            m.pop(transient)
        return {"task": self.task, **m, "prompt": self.prompt, "generation": self.gen_kwargs, **self.settings_extra}


@dataclass
class RunResult:
    ids: list[str]  # every image ID of the run, in order
    records: dict[str, dict]  # ID -> {"id", "text", "error"}
    journal_path: Path
    seconds: float
    generated: int  # images generated in this invocation
    interrupted: bool = False
    writer: bool = True  # False for a shard that only fills its journal (the merge writes the CSVs)

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [(i, self.records[i]["error"]) for i in self.ids if self.records.get(i, {}).get("error")]


def build_config(args: argparse.Namespace, task: str, extra_settings: dict | None = None) -> RunConfig:
    """Validate the shared arguments and turn them into a RunConfig (no model loaded yet)."""
    check_positive(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   checkpoint_interval=args.checkpoint_interval, limit=args.limit)
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not args.image_dir:
        raise UserError("--image_dir is required")
    if not Path(args.image_dir).is_dir():
        raise UserError(f"--image_dir {args.image_dir} is not a folder")
    gen_kwargs = parse_generation_kwargs(args.generation_kwargs, args.max_new_tokens)
    adapter = None if str(args.adapter_repo).lower() in ("none", "") else args.adapter_repo
    template = resolve_template(args.prompt_template, adapter)
    instruction = args.prompt or INSTRUCTIONS[(task, args.language)]
    prefill = "" if args.prompt else ANSWER_PREFIXES.get((task, args.language), "")
    spec = ModelSpec(args.base_model_path, adapter, args.lora_subfolder, args.merge_adapters, args.load_in_4bit,
                     args.device, args.dtype, args.merged_cache_dir)
    resume = args.resume_from_checkpoint
    shard = shard_from(args.num_shards, args.shard_index, args.merge_shards)
    journal = default_journal_path(args.output_csv, args.checkpoint_dir, shard.suffix if shard else "")
    if resume not in (None, "auto"):
        if shard:
            raise UserError("with shards, resume with --resume_from_checkpoint auto (each shard has its journal)")
        journal = Path(resume)
    return RunConfig(task=task, image_dir=args.image_dir, output_csv=args.output_csv, model=spec,
                     prompt=build_prompt(template, instruction, prefill), gen_kwargs=gen_kwargs,
                     batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed, limit=args.limit,
                     checkpoint_dir=args.checkpoint_dir, checkpoint_interval=args.checkpoint_interval, resume=resume,
                     force_resume=args.force_resume, overwrite=args.overwrite, journal_path=journal,
                     settings_extra=extra_settings or {}, shard=shard)


def cpu_split(device_type: str, num_workers: int | None) -> int:
    """Decode workers, and on CPU the model's threads: the two share the cores.

    On a GPU the workers only feed it, so they get up to 4 cores. On CPU, image decoding and the
    model compete; the model's threads are set to the cores the workers leave, because
    oversubscribed cores made both slower (benchmarks/throughput.py: 15 vs 23 images/s on 2 cores).
    """
    import torch

    cores = os.cpu_count() or 1
    if num_workers is None:
        num_workers = min(4, max(1, cores - 1)) if device_type == "cuda" else max(1, cores // 2)
    if device_type == "cpu" and num_workers > 0:
        torch.set_num_threads(max(1, cores - num_workers))
    return num_workers


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current batch; a second one stops at once."""

    def __init__(self):
        self.stop = False
        self.previous = None

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.stop:
                raise KeyboardInterrupt
            self.stop = True
            log("\nstopping after the current batch (Ctrl-C again to stop now)")

        signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def run_items(cfg: RunConfig) -> list[tuple[str, str]]:
    """(ID, path) of every image the whole run covers, before any sharding."""
    items = list_images(cfg.image_dir)
    return items[: cfg.limit] if cfg.limit else items


def run_generation(cfg: RunConfig, model_bundle=None) -> RunResult:
    """Generate raw text for every image not yet in the journal. Returns all records of the run."""
    items = run_items(cfg)
    all_ids = [i for i, _ in items]
    if cfg.shard:
        items = cfg.shard.take(items)
        if cfg.shard.distributed:
            cfg.model.device = init_distributed(cfg.model.device)
    ids = [i for i, _ in items]
    journal = open_journal(cfg.journal_path, cfg.settings(), cfg.resume, cfg.force_resume, cfg.overwrite,
                           cfg.checkpoint_interval, explicit=cfg.resume not in (None, "auto"))
    done = {i for i, r in journal.records.items() if r.get("error") is None}
    todo = [(i, p) for i, p in items if i not in done]
    start = time.perf_counter()
    generated = 0
    interrupted = False
    try:
        if todo:
            import torch
            from tqdm import tqdm

            torch.manual_seed(cfg.seed)
            model, processor, device = model_bundle or load_model(cfg.model)
            tokenizer = processor.tokenizer
            stop_ids = stop_token_ids(tokenizer, model.generation_config)
            threads_before = torch.get_num_threads()
            workers = cpu_split(device.type, cfg.num_workers)
            loader = make_loader(todo, processor, cfg.prompt, cfg.batch_size, workers,
                                 pin_memory=device.type == "cuda")

            def generate(inputs: dict) -> list[str]:
                return generate_texts(model, tokenizer, inputs, device, cfg.gen_kwargs, stop_ids)

            start = time.perf_counter()
            bar = tqdm(total=len(todo), unit="img", desc=cfg.task, dynamic_ncols=True, file=sys.stderr)
            with StopFlag() as flag:
                for batch in loader:
                    entries = [{"id": i, "text": "", "error": err} for i, err in batch.failures]
                    for i, err in batch.failures:
                        bar.write(f"warning: {i}: cannot read image: {err}")
                    if batch.inputs is not None:
                        outs = generate_with_backoff(generate, batch.inputs, len(batch.ids))
                        for i, out in zip(batch.ids, outs, strict=True):
                            failed = isinstance(out, Exception)
                            entries.append({"id": i, "text": "" if failed else out,
                                            "error": f"generation failed: {first_line(out)}" if failed else None})
                    journal.append(entries)
                    generated += len(entries)
                    bar.update(len(entries))
                    bar.set_postfix(img_s=f"{generated / max(time.perf_counter() - start, 1e-9):.2f}")
                    if flag.stop:
                        interrupted = True
                        break
            bar.close()
            torch.set_num_threads(threads_before)
    finally:
        journal.close()
    result = RunResult(ids, journal.records, cfg.journal_path, time.perf_counter() - start, generated, interrupted,
                       writer=cfg.shard is None)
    if cfg.shard and cfg.shard.distributed:
        return gather_shards(result, all_ids)
    return result


def init_distributed(device: str) -> str:
    """Join the launcher's process group; each process takes the GPU of its LOCAL_RANK."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Shards finish at different times; the group must wait for the slowest one, for hours.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=72))
    return f"cuda:{local_rank}" if cuda else ("cpu" if device == "auto" else device)


def gather_shards(result: RunResult, all_ids: list[str]) -> RunResult:
    """Collect every process's records on rank 0, which then writes the CSVs for all images."""
    import torch.distributed as dist

    mine = {"records": {i: result.records[i] for i in result.ids if i in result.records},
            "generated": result.generated, "interrupted": result.interrupted, "seconds": result.seconds}
    everything = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everything, dst=0)
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank != 0:
        result.writer = False
        return result
    records: dict[str, dict] = {}
    for part in everything:
        records.update(part["records"])
    return RunResult(all_ids, records, result.journal_path, max(p["seconds"] for p in everything),
                     sum(p["generated"] for p in everything), any(p["interrupted"] for p in everything))


def merge_shards(cfg: RunConfig) -> RunResult:
    """--merge_shards: all shards' journals -> one result, refusing a missing or incomplete shard."""
    all_ids = [i for i, _ in run_items(cfg)]
    base = default_journal_path(cfg.output_csv, cfg.checkpoint_dir)
    found = sorted(base.parent.glob(f"{base.name.removesuffix('.journal.jsonl')}.shard-*-of-*.journal.jsonl"))
    if not found:
        raise UserError(f"no shard journals like {base.with_suffix('').with_suffix('')}.shard-*-of-*.journal.jsonl")
    counts = {int(re.search(r"-of-(\d+)\.journal", p.name).group(1)) for p in found}
    if len(counts) != 1:
        raise UserError(f"shard journals from runs with different shard counts: {sorted(counts)}; keep one run's")
    count = counts.pop()
    records: dict[str, dict] = {}
    first_settings = None
    problems = []
    for index in range(count):
        shard = Shard(index, count)
        path = default_journal_path(cfg.output_csv, cfg.checkpoint_dir, shard.suffix)
        if not path.exists():
            problems.append(f"shard {index} of {count} is missing ({path.name})")
            continue
        header, shard_records, _ = read_journal(path)
        if first_settings is None:
            first_settings = header.get("settings", {})
        diffs = settings_differences(first_settings, header.get("settings", {}))
        if diffs:
            problems.append(f"shard {index} was run with other settings ({'; '.join(diffs)})")
        missing = [i for i in shard.take(all_ids) if i not in shard_records]
        if missing:
            problems.append(f"shard {index} of {count} is incomplete: {len(missing)} of "
                            f"{len(shard.take(all_ids))} images missing (rerun it with --num_shards {count} "
                            f"--shard_index {index} --resume_from_checkpoint auto)")
        records.update(shard_records)
    if first_settings is not None and first_settings.get("task") != cfg.task:
        problems.append(f"the shards are from a {first_settings.get('task')} run, not {cfg.task}")
    if problems:
        raise UserError("cannot merge: " + "; ".join(problems))
    log(f"merged {count} shards: {len(all_ids)} images")
    return RunResult(all_ids, records, base.parent, 0.0, 0)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def write_csv_atomic(path: str | Path, header: list[str] | None, rows: Iterable[list[str]]) -> Path:
    """Write the whole CSV to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            if header:
                writer.writerow(header)
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def errors_path(output_csv: str | Path) -> Path:
    out = Path(output_csv)
    return out.with_name(f"{out.stem}.errors.csv")


def write_errors(output_csv: str | Path, failures: list[tuple[str, str]]) -> Path | None:
    """List failed images beside the output; remove a stale list when nothing failed."""
    path = errors_path(output_csv)
    if not failures:
        path.unlink(missing_ok=True)
        return None
    return write_csv_atomic(path, ["ID", "Error"], ([i, e] for i, e in failures))


def check_submission(task: str, path: str | Path, ids: list[str]) -> bool:
    """Run the official-rule checks of evaluate.py on a file this run wrote; log what they say."""
    import evaluate

    report = evaluate.validate_file(task, path, ids)
    evaluate.log_report(report, str(path), limit=10)
    return report.accepted


def finish_run(result: RunResult, output_csv: str | Path, outputs: list[Path], rejected: bool = False) -> int:
    """Errors file, summary, exit code (130 after Ctrl-C with the command to resume, 1 if a check failed)."""
    failures = result.failures
    # Only the process that writes the CSVs writes the errors file: shards would overwrite each other's.
    errors_file = write_errors(output_csv, failures) if result.writer else None
    rate = result.generated / result.seconds if result.seconds > 0 and result.generated else 0.0
    lines = [
        f"images: {len(result.ids)} (generated now: {result.generated}, from the journal: "
        f"{len(result.ids) - result.generated})",
        f"failures: {len(failures)}" + (f" (listed in {errors_file})" if errors_file else ""),
        f"time: {result.seconds:.1f} s, {rate:.2f} images/s",
        f"journal: {result.journal_path}",
    ]
    if result.interrupted:
        lines.append("interrupted: rerun the same command with --resume_from_checkpoint auto to continue")
    elif not result.writer:
        lines.append("this shard is done; when every shard is, build the CSVs with the same command, "
                     "--merge_shards instead of --num_shards/--shard_index"
                     if not os.environ.get("WORLD_SIZE") else "this process's share is done; rank 0 writes the CSVs")
    else:
        lines += [f"wrote: {p}" for p in outputs]
    log("\n".join(lines))
    return 130 if result.interrupted else 1 if rejected else 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def iter_rows(ids: list[str], records: dict[str, dict], convert: Callable[[str], str]) -> Iterator[list[str]]:
    for i in ids:
        rec = records.get(i)
        yield [i, convert(rec["text"]) if rec and not rec.get("error") else ""]
