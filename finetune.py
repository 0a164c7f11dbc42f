"""LoRA fine-tuning of LLaVA-LLaMA-3-8B on ROCOv2-style data: the adapter the generate scripts load.

    python finetune.py --image_dir /data/train/images --captions_csv train_captions.csv \\
        --concepts_csv train_concepts.csv --cui_mapping_file cui_mapping.csv \\
        --valid_image_dir /data/valid/images --valid_captions_csv valid_captions.csv \\
        --valid_concepts_csv valid_concepts.csv --output_dir adapters/run1 --load_in_4bit
    python generate_captions.py --adapter_repo adapters/run1 ...
    torchrun --standalone --nproc_per_node 4 finetune.py ... --gradient_accumulation_steps 2   # 4 GPUs

Defaults reproduce the published adapter's recipe: LoRA r=16, alpha 32, dropout 0.05 on every
attention and MLP projection of the language model and on the projector; the `vicuna` prompt with
the Spanish instructions; caption and concept examples; 1 epoch, lr 5e-5, cosine, 3% warm-up,
effective batch 32; loss on the answer tokens only. Prompts come from jjvmed/prompts.py, the same ones
generation uses, so training and inference cannot drift apart.

A run survives real data and real clusters: images that cannot be read are skipped and listed in
`finetune_errors.csv`; SIGINT/SIGTERM save a checkpoint at the end of the current optimizer step
and exit 130/143 with the command that resumes; under torchrun/accelerate it trains data-parallel
and only rank 0 writes. `loss_curve.png` shows the training loss at the end.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from jjvmed import errors, files, prompts
from jjvmed.cui_mapper import CuiMapper, load_mapper
from jjvmed.generation import generate_batches
from jjvmed.images import id_sort_key, ignore_stop_signals, list_images, load_image, make_loader
from jjvmed.model import (
    DEFAULT_BASE_MODEL,
    load_base_model,
    load_processor,
    resolve_device_and_dtype,
)

# The language model's attention and MLP projections, and the projector (transformers-5 names).
LORA_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
                r"|model\.multi_modal_projector\.linear_[12]")

IGNORE = -100
SUMMARY_FILE = "finetune_summary.json"
ERRORS_FILE = "finetune_errors.csv"
LOSS_CURVE_FILE = "loss_curve.png"
PROGRESS_FILE = "finetune_progress.json"  # in every checkpoint: what training has fed the model so far
# Collator keys for the run's own bookkeeping; the trainer takes them out before the model sees the batch.
BOOKKEEPING_KEYS = ("example_index", "decode_failures")
HEADER_CHECK_THREADS = 8  # opening files waits on storage (often a network file system), not on the CPU


@dataclass
class Example:
    image_id: str
    image_path: str
    task: str  # caption | concepts
    answer: str


def read_id_table(path: str | None, value_column: str) -> dict[str, str]:
    """ID -> value from an ImageCLEF CSV (`ID,Caption` or `ID,CUIs`)."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise errors.UserError(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().casefold() for h in next(reader, [])]
        if "id" not in header or value_column.casefold() not in header:
            raise errors.UserError(f"{path} needs the columns ID,{value_column}; it has: {', '.join(header)}")
        i, v = header.index("id"), header.index(value_column.casefold())
        return {row[i]: row[v] if len(row) > v else "" for row in reader if row}


def build_examples(image_dir: str, captions_csv: str | None, concepts_csv: str | None,
                   names: dict[str, str], language: str = "es") -> tuple[list[Example], Counter]:
    """Caption and concept examples for every image with data; problems are counted, not fatal."""
    images = dict(list_images(image_dir))
    captions = read_id_table(captions_csv, "Caption")
    concepts = read_id_table(concepts_csv, "CUIs")
    problems: Counter = Counter()
    examples: list[Example] = []
    prefix = prompts.ANSWER_PREFIXES[("concepts", language)]
    for image_id in sorted(set(captions) | set(concepts), key=id_sort_key):
        path = images.get(image_id)
        if path is None:
            problems["ID in a CSV but no image file"] += 1
            continue
        if captions and concepts and (image_id not in captions or image_id not in concepts):
            problems["ID in one CSV and not the other"] += 1
        if image_id in captions:
            caption = " ".join(captions[image_id].split())
            if caption:
                examples.append(Example(image_id, path, "caption", caption))
            else:
                problems["empty caption"] += 1
        if image_id in concepts:
            cuis = [c.strip().upper() for c in concepts[image_id].split(";") if c.strip()]
            unknown = [c for c in cuis if c not in names]
            if unknown:
                problems["CUI not in the mapping file (left out)"] += len(unknown)
            known = [names[c] for c in cuis if c in names]
            if cuis and not known:
                problems["concept row with no known CUI"] += 1
                continue
            answer = f"{prefix} {', '.join(known)}" if known else prompts.NO_CONCEPTS_ANSWER
            examples.append(Example(image_id, path, "concepts", answer))
    problems["image file with no CSV row"] = len(set(images) - set(captions) - set(concepts))
    return examples, problems


# Unreadable training images: a header pre-pass before the model loads, and stand-ins during training.
#
# The pre-pass (Image.open + verify: the header, and for PNG the chunk checksums; no pixels decoded)
# finds what real data mostly holds -- files that are not images, empty or cut short. It costs
# 0.1-0.5 ms a file (measured on 1841x1955 PNGs and JPEGs, whose full decoding takes 16-28 ms), split
# over the processes: seconds for ROCOv2's 60,000 training images, where decoding them all up front
# would cost as much as an epoch of preprocessing. Done first, the step count and learning-rate
# schedule are computed on the examples that will really be trained on, and the errors file is
# complete before hours of training.
# A file that passes the header check and still fails to decode (a truncated JPEG, an image over
# load_image's pixel budget) is replaced, in its batch, by the next example that decodes: dropping
# the row would change the batch and, under several processes, the steps each rank takes, which
# must be identical. Every stand-in and failure is counted (Ledger), so the reported numbers are exact.

def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


def header_error(path: str) -> str | None:
    """None if PIL reads the file's header as an image, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file cannot be trained on
        return error_text(e)
    return None


def unreadable_images(paths: list[str], rank: int = 0, world: int = 1) -> dict[str, str]:
    """path -> error for this process's share (every world-th of the sorted paths) that fail the header check."""
    from PIL import Image

    mine = sorted(set(paths))[rank::world]
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the pixel budget is load_image's to enforce; a header check must not guess it
    try:
        with ThreadPoolExecutor(HEADER_CHECK_THREADS) as pool:
            found = dict(zip(mine, pool.map(header_error, mine), strict=True))
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return {p: e for p, e in found.items() if e}


def gather(obj) -> list:
    """`obj` from every process of the launcher's group, in rank order; [obj] when there is no group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_training_images(examples: list[Example], rank: int, world: int) -> dict[str, str]:
    """The header pre-pass split over the processes; every process gets the same path -> error map."""
    digest = hashlib.sha256("\n".join(f"{e.image_path}\t{e.task}\t{e.answer}" for e in examples).encode()).hexdigest()
    parts = gather((digest, unreadable_images([e.image_path for e in examples], rank, world)))
    if len({d for d, _ in parts}) > 1:
        raise errors.UserError("the processes read different training data (files changed while starting?); "
                               "run the command again")
    return {path: error for _, found in parts for path, error in found.items()}


class TrainDataset:
    """Decodes and tokenizes one example on demand: prompt and image tokens masked, answer kept."""

    def __init__(self, examples: list[Example], processor, template: str, language: str, max_length: int):
        self.examples = examples
        self.processor = processor
        self.prompts = {task: prompts.build_prompt(template, prompts.INSTRUCTIONS[(task, language)])
                        for task in ("caption", "concepts")}
        self.max_length = max_length
        self.eos = processor.tokenizer.eos_token

    def __len__(self) -> int:
        return len(self.examples)

    def encode(self, ex: Example) -> dict:
        import torch

        image = load_image(ex.image_path)
        prompt = self.processor(text=self.prompts[ex.task], images=image, return_tensors="pt")
        answer = self.processor.tokenizer(" " + ex.answer + self.eos, add_special_tokens=False,
                                          return_tensors="pt")["input_ids"][0]
        prompt_ids = prompt["input_ids"][0]
        input_ids = torch.cat([prompt_ids, answer])[: self.max_length]
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE), answer])[: self.max_length]
        return {"input_ids": input_ids, "labels": labels, "pixel_values": prompt["pixel_values"][0]}

    def __getitem__(self, index: int) -> dict:
        """The example, or the next one that decodes in its place; the ones that failed travel with it."""
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:  # the Trainer's loader takes no worker_init_fn: do it here
            ignore_stop_signals()
        failures: list[tuple[str, str]] = []
        for offset in range(len(self.examples)):
            i = (index + offset) % len(self.examples)
            try:
                item = self.encode(self.examples[i])
            except Exception as e:  # noqa: BLE001 - any image that fails is listed, not fatal
                failures.append((self.examples[i].image_id, error_text(e)))
                continue
            return {**item, "example_index": i, "decode_failures": failures}
        raise errors.UserError(f"none of the {len(self.examples)} training images decodes; first error: "
                               f"{failures[0][1]}")


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        import torch

        longest = max(len(x["input_ids"]) for x in items)

        def pad(t, value):
            return torch.cat([t, torch.full((longest - len(t),), value, dtype=t.dtype)])

        return {
            "input_ids": torch.stack([pad(x["input_ids"], self.pad_id) for x in items]),
            "attention_mask": torch.stack([pad(torch.ones_like(x["input_ids"]), 0) for x in items]),
            "labels": torch.stack([pad(x["labels"], IGNORE) for x in items]),
            "pixel_values": torch.stack([x["pixel_values"] for x in items]),
            "example_index": [x["example_index"] for x in items],
            "decode_failures": [f for x in items for f in x["decode_failures"]],
        }


@dataclass
class Ledger:
    """What training really fed the model: which examples (one bit each), how many rows, which images failed.

    Each process keeps its own; they are merged at every checkpoint and at the end. Kept in the
    checkpoints, so the counts of a resumed run cover the whole training.
    """

    size: int
    seen: bytes = b""
    samples: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # image ID -> error

    def record(self, indices: list[int], failures: list[tuple[str, str]]) -> None:
        bits = int.from_bytes(self.seen, "little") if self.seen else 0
        for i in indices:
            bits |= 1 << i
        self.seen = bits.to_bytes((self.size + 7) // 8, "little")
        self.samples += len(indices)
        self.failures.update(failures)

    @property
    def examples(self) -> int:
        return int.from_bytes(self.seen, "little").bit_count() if self.seen else 0

    def to_json(self) -> dict:
        return {"examples": self.size, "seen": base64.b64encode(zlib.compress(self.seen)).decode(),
                "samples": self.samples, "failures": self.failures}

    @staticmethod
    def from_json(data: dict) -> Ledger:
        return Ledger(data["examples"], zlib.decompress(base64.b64decode(data["seen"])), data["samples"],
                      dict(data["failures"]))


def merge_ledgers(parts: list[Ledger]) -> Ledger:
    bits = 0
    for part in parts:
        bits |= int.from_bytes(part.seen, "little") if part.seen else 0
    failures: dict[str, str] = {}
    for part in parts:
        failures.update(part.failures)
    size = parts[0].size
    return Ledger(size, bits.to_bytes((size + 7) // 8, "little"), sum(p.samples for p in parts), failures)


def load_ledger(checkpoint: str | None, size: int) -> Ledger:
    """The ledger saved with a checkpoint, or an empty one (a new run, or one started before ledgers)."""
    if checkpoint is None:
        return Ledger(size)
    path = Path(checkpoint) / PROGRESS_FILE
    if not path.is_file():
        errors.log(f"{checkpoint} has no {PROGRESS_FILE}: examples_trained and samples_trained count from here")
        return Ledger(size)
    ledger = Ledger.from_json(json.loads(path.read_text()))
    if ledger.size != size:
        errors.log(f"{path} counts {ledger.size} examples, this run has {size}: the counts start again")
        return Ledger(size)
    return ledger


# Stopping on a signal. Schedulers send SIGTERM at the time limit (Slurm then waits KillWait, 30 s by
# default, before SIGKILL); Ctrl-C sends SIGINT. Both ask for a checkpoint at the end of the current
# optimizer step, which Trainer writes from its normal save path, so resuming is exactly the normal resume.

class StopSignals:
    """Catches SIGINT and SIGTERM during training; the handlers in place before are restored after.

    A second Ctrl-C, a second or more after the first, stops at once without a checkpoint (one
    process only: launchers forward to every process a signal it has often already received).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.received: int | None = None  # the first signal this process got
        self.agreed = 0  # the signal all processes stopped for (set at a step end), 0 if none
        self.received_at = 0.0
        self.previous: dict = {}

    def handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            again = "" if self.distributed or signum != signal.SIGINT else " (Ctrl-C again to stop at once, unsaved)"
            errors.log(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this optimizer step, "
                       f"then stopping{again}")
        elif signum == signal.SIGINT and not self.distributed and time.monotonic() - self.received_at > 1:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def agreed_signal(received: int | None, device) -> int:
    """The signal any process received (0 if none): every process must stop at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return received or 0
    flag = torch.tensor([received or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def make_trainer(model, training_args, dataset: TrainDataset, collator: Collator, ledger: Ledger,
                 stop: StopSignals):
    """Trainer that keeps `ledger` and stops on `stop`'s signals; the classes are made here because
    transformers loads only when training starts (so `--help` is instant)."""
    from transformers import Trainer, TrainerCallback

    class LedgerTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ledger.record(inputs["example_index"], inputs["decode_failures"])
            model_inputs = {k: v for k, v in inputs.items() if k not in BOOKKEEPING_KEYS}
            return super().training_step(model, model_inputs, num_items_in_batch)

    class RunCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                errors.log(f"training started at step {state.global_step} of {state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            # One plain line per log for batch-job log files (the progress bar is for terminals).
            if state.is_world_process_zero and logs and "loss" in logs:
                errors.log(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                           f"lr {logs.get('learning_rate', 0):.3g}, epoch {state.epoch:.2f}")

        def on_step_end(self, args, state, control, **kwargs):
            stop.agreed = agreed_signal(stop.received, args.device)
            if stop.agreed:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            merged = merge_ledgers(gather(ledger))  # every process takes part; rank 0 writes
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                files.write_text_atomic(checkpoint / PROGRESS_FILE, json.dumps(merged.to_json()))

    return LedgerTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                         callbacks=[RunCallback()])


def lora_model(model, r: int, alpha: int, dropout: float, load_in_4bit: bool, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # Non-reentrant checkpointing: the reentrant kind breaks DistributedDataParallel's gradient hooks.
    checkpointing = {"use_reentrant": False}
    if load_in_4bit:
        # QLoRA: fp32 norms and inputs that need grads, so gradients flow through the frozen 4-bit base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def training_arguments(args: argparse.Namespace, cuda: bool, dtype):
    """Trainer settings from the flags. Creating them joins the launcher's process group, if there is one."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float below 1 is a ratio of all steps
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        logging_steps=args.logging_steps,
        logging_first_step=True,  # the loss curve starts at the untrained model
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        dataloader_num_workers=args.num_workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
        report_to=[],
        use_cpu=not cuda,
    )


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: None for a fresh start, 'auto' = the latest in output_dir."""
    if value is None:
        return None
    if value == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if not (Path(value) / "trainer_state.json").is_file():
        raise errors.UserError(f"--resume_from_checkpoint {value} is not a Trainer checkpoint (no trainer_state.json); "
                               "give a checkpoint-N folder or 'auto'")
    return value


def resume_command(script: str, argv: list[str], world: int) -> str:
    """How to continue this run: its own arguments with --resume_from_checkpoint auto (under the same launcher
    when there are several processes)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip or arg.startswith("--resume_from_checkpoint="):
            skip = False
            continue
        if arg == "--resume_from_checkpoint":
            skip = True
            continue
        kept.append(arg)
    again = shlex.join([script, *kept, "--resume_from_checkpoint", "auto"])
    return f"the same launch command, same number of processes: {again}" if world > 1 else f"python {again}"


def save_adapter(model, output_dir: str) -> None:
    """PEFT's save_pretrained into a temporary folder, then each file moved in whole."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter-"))
    try:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_errors_file(output_dir: str, failures: dict[str, str]) -> Path:
    """ID,Error for every training image that could not be used (header only if none)."""
    rows = [[i, failures[i]] for i in sorted(failures, key=id_sort_key)]
    return files.write_csv_atomic(Path(output_dir) / ERRORS_FILE, ["ID", "Error"], rows)


VALIDATION_LABELS = {"caption_rouge1": "caption ROUGE-1", "concepts_f1": "concept F1"}


def loss_curve_png(log_history: list[dict], validation: dict | None, title: str,
                   resumed_from: int | None = None) -> bytes:
    """PNG of the training loss over optimizer steps; validation scores, when computed, in a second panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    scores = {label: validation[key] for key, label in VALIDATION_LABELS.items() if key in (validation or {})}
    fig = Figure(figsize=(9, 4) if scores else (7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, width_ratios=[3, 1]) if scores else [fig.subplots()]
    ax = axes[0]
    if losses:
        ax.plot(*zip(*losses, strict=True), marker="o" if len(losses) <= 30 else None, markersize=3,
                label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "s", color="tab:red", label="validation loss")
    if resumed_from:
        ax.axvline(resumed_from, linestyle="--", color="grey", label=f"resumed at step {resumed_from}")
    if not losses and not evals:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if evals or resumed_from:
        ax.legend()
    if scores:
        bars = axes[1].bar(list(scores), list(scores.values()), color=["tab:green", "tab:purple"][: len(scores)])
        axes[1].bar_label(bars, fmt="%.3f")
        axes[1].set_ylim(0, 1)
        images = max(validation.get("caption_images", 0), validation.get("concepts_images", 0))
        axes[1].set_title(f"validation after training ({images} images)", fontsize=10)
        axes[1].tick_params(axis="x", labelsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA fine-tuning of LLaVA-LLaMA-3-8B for ImageCLEFmedical Caption "
                                "(the recipe of the published JJ-VMed adapter by default). Several GPUs: start it "
                                "with torchrun or accelerate launch.")
    data = p.add_argument_group("data")
    data.add_argument("--image_dir", required=True,
                      help="training images; ID = file name without extension (required)")
    data.add_argument("--captions_csv", help="ID,Caption file: one caption example per image (default: none)")
    data.add_argument("--concepts_csv",
                      help="ID,CUIs file: one concept example per image; needs --cui_mapping_file (default: none)")
    data.add_argument("--cui_mapping_file",
                      help="CUI,Canonical name file that turns CUIs into the answer's names (default: none)")
    data.add_argument("--valid_image_dir",
                      help="validation images, generated and scored after training (default: none, no validation)")
    data.add_argument("--valid_captions_csv", help="ID,Caption ground truth for --valid_image_dir (default: none)")
    data.add_argument("--valid_concepts_csv", help="ID,CUIs ground truth for --valid_image_dir (default: none)")
    data.add_argument("--eval_images", type=int, default=50,
                      help="validation images generated and scored after training; 0 skips it (default: %(default)s)")
    data.add_argument("--language", choices=["es", "en"], default="es",
                      help="instruction language; es = the published adapter's (default: %(default)s)")
    data.add_argument("--max_length", type=int, default=1024,
                      help="tokens per example, prompt and 576 image tokens included (default: %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL,
                       help="hub ID or local folder of the LLaVA base model (default: %(default)s)")
    model.add_argument("--load_in_4bit", action="store_true",
                       help="QLoRA: train LoRA on a 4-bit NF4 base, about 6 GB for the 8B model (default: off)")
    model.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                       help="auto = CUDA if present (one GPU per process under torchrun), else CPU "
                            "(default: %(default)s)")
    model.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                       help="weights and mixed precision; auto = bf16 on GPUs that have it, else fp16; fp32 on "
                            "CPU (default: %(default)s)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    lora.add_argument("--lora_alpha", type=int, default=32,
                      help="LoRA scaling; the update is scaled by alpha / r (default: %(default)s)")
    lora.add_argument("--lora_dropout", type=float, default=0.05,
                      help="dropout on the LoRA input (default: %(default)s)")
    train = p.add_argument_group("training")
    train.add_argument("--output_dir", required=True,
                       help="adapter, Trainer checkpoints, finetune_summary.json, finetune_errors.csv and "
                            "loss_curve.png go here (required)")
    train.add_argument("--epochs", type=float, default=1.0,
                       help="passes over the training examples (default: %(default)s)")
    train.add_argument("--max_steps", type=int, default=-1,
                       help="stop after N optimizer steps, overriding --epochs; -1 = use --epochs "
                            "(default: %(default)s)")
    train.add_argument("--learning_rate", type=float, default=5e-5, help="peak learning rate (default: %(default)s)")
    train.add_argument("--lr_scheduler", default="cosine",
                       help="transformers scheduler name: cosine, linear, constant, ... (default: %(default)s)")
    train.add_argument("--warmup_ratio", type=float, default=0.03,
                       help="fraction of all steps spent warming the learning rate up (default: %(default)s)")
    train.add_argument("--batch_size", type=int, default=4,
                       help="examples per device per forward pass (default: %(default)s)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=8,
                       help="forward passes per optimizer step; global batch = batch_size x this x processes "
                            "(default: %(default)s, so 4 x 8 = 32 on one GPU)")
    train.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="recompute activations in the backward pass: much less memory, ~30%% slower "
                            "(default: on)")
    train.add_argument("--logging_steps", type=int, default=10,
                       help="log the mean training loss every N optimizer steps (default: %(default)s)")
    train.add_argument("--save_steps", type=int, default=200,
                       help="write a Trainer checkpoint every N optimizer steps; the last 2 are kept "
                            "(default: %(default)s)")
    train.add_argument("--num_workers", type=int, default=2,
                       help="DataLoader processes decoding images per training process (default: %(default)s)")
    train.add_argument("--seed", type=int, default=42,
                       help="seed for data order, LoRA init and dropout (default: %(default)s)")
    train.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|auto",
                       help="continue from a Trainer checkpoint: a checkpoint-N folder, or 'auto' = the latest "
                            "in --output_dir (none there: start at step 0) (default: start fresh)")
    return p


def evaluate_adapter(model, processor, args, mapper) -> dict:
    """Generate for the first --eval_images validation images and score them with scores.py.

    Uses the generation core and the prompts, token limits and post-processing of the generate
    scripts, so the scores say what those scripts would give.
    """
    from jjvmed import scores
    from jjvmed.prompts import parse_answer

    names = mapper.names if mapper else {}
    examples, _ = build_examples(args.valid_image_dir, args.valid_captions_csv, args.valid_concepts_csv, names,
                                 args.language)
    results: dict = {}
    for task in ("caption", "concepts"):
        chosen = [e for e in examples if e.task == task][: args.eval_images]
        if not chosen:
            continue
        prompt = prompts.build_prompt("vicuna", prompts.INSTRUCTIONS[(task, args.language)],
                                     prompts.ANSWER_PREFIXES.get((task, args.language), ""))
        loader = make_loader([(e.image_id, e.image_path) for e in chosen], processor, prompt, args.batch_size, 0)
        gen_kwargs = {"max_new_tokens": prompts.MAX_NEW_TOKENS[task], "do_sample": False, "num_beams": 1}
        texts = {r.id: r.text for records in generate_batches(model, processor, loader, gen_kwargs) for r in records}
        if task == "caption":
            gt = {e.image_id: e.answer for e in chosen}
            pred = {i: prompts.clean_caption(t) for i, t in texts.items()}
            summary, _ = scores.caption_scores(gt, pred)
            results["caption_rouge1"] = summary["rouge1"]
        else:
            truth = read_id_table(args.valid_concepts_csv, "CUIs")
            gt = {e.image_id: tuple(c.strip() for c in truth[e.image_id].split(";")) for e in chosen}
            pred = {i: tuple(mapper.map_phrases(parse_answer(t, mapper))[0]) for i, t in texts.items()}
            summary, _ = scores.concept_scores(gt, pred)
            results["concepts_f1"] = summary["f1"]
        results[f"{task}_images"] = len(chosen)
    return results


# The steps of a run, in the order main() takes them: read the data, start the processes, drop the
# examples whose images cannot be read, load the model with LoRA, train, then (rank 0 only) save the
# adapter, score it on the validation images, and write the summary and the loss curve.

def read_training_data(image_dir: str, captions_csv: str | None, concepts_csv: str | None,
                       cui_mapping_file: str | None, language: str) -> tuple[CuiMapper | None, list[Example], Counter]:
    """The CUI mapper (None without a mapping file), the training examples and the data problems counted."""
    if not captions_csv and not concepts_csv:
        raise errors.UserError("give --captions_csv and/or --concepts_csv")
    if concepts_csv and not cui_mapping_file:
        raise errors.UserError("--concepts_csv needs --cui_mapping_file to turn CUIs into names")
    # Read once: its names make the training answers and its index maps the validation answers.
    mapper = load_mapper(cui_mapping_file) if cui_mapping_file else None
    names = mapper.names if mapper else {}
    examples, problems = build_examples(image_dir, captions_csv, concepts_csv, names, language)
    return mapper, examples, problems


def start_processes(args: argparse.Namespace) -> tuple:
    """(Trainer settings, device map, dtype); creating the settings joins torchrun's / accelerate's process group."""
    import torch

    device_map, dtype = resolve_device_and_dtype(args.device, args.dtype)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    training_args = training_arguments(args, cuda, dtype)
    # Under a launcher each process holds the whole model on its own device (data parallel).
    device_map = {"": str(training_args.device)} if training_args.world_size > 1 else device_map
    return training_args, device_map, dtype


def quiet(message: str) -> None:
    """The log of every process but rank 0: one process speaks for all."""


def drop_unreadable(examples: list[Example], problems: Counter, output_dir: str, rank: int, world: int,
                    say: Callable[[str], None]) -> tuple[list[Example], dict[str, str]]:
    """The examples whose images pass the header check, and image ID -> error for the others.

    The unreadable images are listed in the errors file now, so the list is there while training runs.
    """
    started = time.monotonic()
    bad_paths = check_training_images(examples, rank, world)
    unreadable = {e.image_id: bad_paths[e.image_path] for e in examples if e.image_path in bad_paths}
    usable = [e for e in examples if e.image_path not in bad_paths]
    counts = Counter(e.task for e in usable)
    say(f"examples: {len(usable)} ({counts['caption']} caption, {counts['concepts']} concepts)")
    for problem, n in problems.items():
        if n:
            say(f"  skipped or adjusted: {problem}: {n}")
    errors_path = Path(output_dir) / ERRORS_FILE
    say(f"image check: {len({e.image_path for e in examples})} files in {time.monotonic() - started:.1f} s")
    if unreadable:
        say(f"  skipped: image cannot be read: {len(unreadable)} ({len(examples) - len(usable)} examples), "
            f"listed in {errors_path}")
    if rank == 0:
        write_errors_file(output_dir, unreadable)
    if not usable:
        raise errors.UserError("no usable training examples; check the IDs in the CSVs against the image names"
                               + (f" and the unreadable images in {errors_path}" if unreadable else ""))
    return usable, unreadable


def load_lora_model(args: argparse.Namespace, device_map: str | dict, dtype, say: Callable[[str], None]) -> tuple:
    """(the base model with fresh LoRA weights, its processor)."""
    from transformers import set_seed

    set_seed(args.seed)  # before LoRA's random init, so --seed makes two runs the same
    processor = load_processor(args.base_model_path)
    base = load_base_model(args.base_model_path, device_map, dtype, args.load_in_4bit)
    model = lora_model(base, args.lora_r, args.lora_alpha, args.lora_dropout, args.load_in_4bit,
                       args.gradient_checkpointing)
    say(f"trainable LoRA parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    return model, processor


def shared_checkpoint(value: str | None, output_dir: str, say: Callable[[str], None]) -> str | None:
    """The checkpoint every process resumes from (None: start at step 0)."""
    # Rank 0 picks the checkpoint, so every process resumes from the same step; they all must see it.
    resume = gather(resolve_resume(value, output_dir))[0]
    if resume and not all(gather(Path(resume).is_dir())):
        raise errors.UserError(f"{resume} is not visible to every process: --output_dir must be on a file system "
                               "all nodes share")
    if value == "auto" and not resume:
        say(f"no checkpoint in {output_dir} yet: training starts at step 0")
    return resume


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The optimizer step a checkpoint was saved at; None for no checkpoint."""
    if checkpoint is None:
        return None
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]


@dataclass
class Trained:
    """What training left: the loss, the steps, the log and what all processes fed the model."""

    train_loss: float
    global_step: int
    max_steps: int
    log_history: list[dict]
    seen: Ledger
    stopped_by: int  # the signal all processes stopped for, 0 if none


def train(model, processor, examples: list[Example], training_args, resume: str | None, language: str,
          max_length: int) -> Trained:
    """Trainer.train on the examples: it changes `model`'s LoRA weights, nothing else it is given.

    SIGINT/SIGTERM stop it at the end of an optimizer step (Trained.stopped_by); a second Ctrl-C raises
    KeyboardInterrupt at once.
    """
    # Only rank 0 carries the counts of the steps before the resume, so merging never counts them twice.
    ledger = load_ledger(resume if training_args.process_index == 0 else None, len(examples))
    stop = StopSignals(distributed=training_args.world_size > 1)
    trainer = make_trainer(model, training_args, TrainDataset(examples, processor, "vicuna", language, max_length),
                           Collator(processor.tokenizer.pad_token_id), ledger, stop)
    with stop:
        result = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    return Trained(result.training_loss, state.global_step, state.max_steps, state.log_history,
                   merge_ledgers(gather(ledger)), stop.agreed)


def validation_scores(model, processor, args: argparse.Namespace, mapper: CuiMapper | None) -> dict | None:
    """Scores on the validation images after training; None when there are none to score."""
    if not (args.valid_image_dir and args.eval_images > 0):
        return None
    model.eval()  # no dropout while generating
    return evaluate_adapter(model, processor, args, mapper)


def batch_sizes(per_device: int, accumulation: int, world: int) -> dict[str, int]:
    """The batch sizes the summary records; the global batch is what one optimizer step learns from."""
    return {"world_size": world, "per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation,
            "global_batch_size": per_device * accumulation * world}


def run_summary(examples: list[Example], problems: Counter, failures: dict[str, str], trained: Trained,
                batch: dict[str, int], resumed_from: int | None, validation: dict | None, errors_file: Path,
                curve: Path) -> dict:
    """finetune_summary.json's content."""
    skipped = {k: v for k, v in problems.items() if v}
    if failures:
        skipped[f"image cannot be read (listed in {ERRORS_FILE})"] = len(failures)
    summary = {"examples": dict(Counter(e.task for e in examples)), "skipped": skipped,
               "unreadable_images": len(failures), "examples_trained": trained.seen.examples,
               "samples_trained": trained.seen.samples, "train_loss": trained.train_loss,
               "global_step": trained.global_step, **batch}
    if resumed_from is not None:
        summary["resumed_from_step"] = resumed_from
    if validation is not None:
        summary["validation"] = validation
    return {**summary, "errors_file": str(errors_file), "loss_curve": str(curve)}


def write_loss_curve(output_dir: str, trained: Trained, validation: dict | None, global_batch: int,
                     resumed_from: int | None) -> Path:
    """loss_curve.png: the training loss over the steps, titled with the run's size."""
    title = (f"{Path(output_dir).name}: {trained.global_step} steps, global batch {global_batch}, "
             f"{trained.seen.examples:,} examples")
    png = loss_curve_png(trained.log_history, validation, title, resumed_from)
    return files.write_bytes_atomic(Path(output_dir) / LOSS_CURVE_FILE, png)


def main(argv: list[str] | None = None) -> int:
    """A training run, step by step; every process takes each step, rank 0 alone writes the results."""
    script = sys.argv[0] if argv is None else "finetune.py"
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    mapper, examples, problems = read_training_data(args.image_dir, args.captions_csv, args.concepts_csv,
                                                    args.cui_mapping_file, args.language)
    training_args, device_map, dtype = start_processes(args)
    rank, world = training_args.process_index, training_args.world_size
    say = errors.log if rank == 0 else quiet
    usable, unreadable = drop_unreadable(examples, problems, args.output_dir, rank, world, say)
    model, processor = load_lora_model(args, device_map, dtype, say)
    batch = batch_sizes(args.batch_size, args.gradient_accumulation_steps, world)
    say(f"global batch: {batch['global_batch_size']} = {args.batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {world} process{'es' if world > 1 else ''}")
    resume = shared_checkpoint(args.resume_from_checkpoint, args.output_dir, say)
    resumed_from = checkpoint_step(resume)
    again = resume_command(script, argv, world)
    try:
        trained = train(model, processor, usable, training_args, resume, args.language, args.max_length)
    except KeyboardInterrupt:
        say(f"stopped at once, without a checkpoint for this step; to continue from the latest one:\n  {again}")
        return 130
    if trained.stopped_by and trained.global_step < trained.max_steps:
        say(f"stopped by {signal.Signals(trained.stopped_by).name} at step {trained.global_step} of "
            f"{trained.max_steps}; checkpoint: {Path(args.output_dir) / f'checkpoint-{trained.global_step}'}\n"
            f"to continue:\n  {again}")
        return 128 + trained.stopped_by
    if rank != 0:
        return 0  # rank 0 writes the adapter, the errors file, the summary and the plot

    save_adapter(model, args.output_dir)
    failures = {**unreadable, **trained.seen.failures}
    errors_file = write_errors_file(args.output_dir, failures)
    validation = validation_scores(model, processor, args, mapper)
    curve = write_loss_curve(args.output_dir, trained, validation, batch["global_batch_size"], resumed_from)
    summary = run_summary(usable, problems, failures, trained, batch, resumed_from, validation, errors_file, curve)
    files.write_text_atomic(Path(args.output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2))
    errors.log(json.dumps(summary, indent=2) + f"\nadapter saved to {args.output_dir}; use it with "
               f"--adapter_repo {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
