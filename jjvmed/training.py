"""LoRA training of LLaVA on ROCOv2-style data: the examples (the adapter's prompts and answers), the
dataset and collator (loss on the answer only), the ledger of what training fed the model, the Trainer
with its stop-at-a-signal callback, the LoRA set-up, saving the adapter, and the loss curve.
finetune.py is its command line.

Prompts come from prompts.py, the same ones generation uses, so training and inference cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import files, prompts
from .errors import UserError, log, quiet_library_deprecations
from .images import id_sort_key, ignore_stop_signals, list_images, load_image
from .shards import gather_everywhere
from .signals import StopSignals
from .tables import read_id_table

# The language model's attention and MLP projections, and the projector (transformers-5 names).
LORA_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
                r"|model\.multi_modal_projector\.linear_[12]")
IGNORE = -100
IMAGE_TOKENS = 576  # (336 / 14)^2 patches of the CLIP ViT-L/14-336 tower: every example opens with them
MIN_MAX_LENGTH = IMAGE_TOKENS + 64  # tokens: the image, the prompt (~30) and the start of the answer
ERRORS_FILE = "finetune_errors.csv"  # every training image that could not be used
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


NO_IMAGE = "ID in a CSV but no image file"


def build_examples(image_dir: str, captions_csv: str | None, concepts_csv: str | None,
                   names: dict[str, str], language: str = "es") -> tuple[list[Example], Counter, dict[str, str]]:
    """Caption and concept examples for every image with data; problems are counted, not fatal.
    Returns the examples, the problems counted, and ID -> why for the IDs that have no image."""
    images = dict(list_images(image_dir))
    captions = read_id_table(captions_csv, "Caption") if captions_csv else {}
    concepts = read_id_table(concepts_csv, "CUIs") if concepts_csv else {}
    problems: Counter = Counter()
    no_image: dict[str, str] = {}
    examples: list[Example] = []
    prefix = prompts.ANSWER_PREFIXES[("concepts", language)]
    for image_id in sorted(set(captions) | set(concepts), key=id_sort_key):
        path = images.get(image_id)
        if path is None:
            problems[NO_IMAGE] += 1
            no_image[image_id] = f"no image file named {image_id}.<extension> in {image_dir}"
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
    return examples, problems, no_image


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


def check_training_images(examples: list[Example], rank: int, world: int) -> dict[str, str]:
    """The header pre-pass split over the processes; every process gets the same path -> error map."""
    digest = hashlib.sha256("\n".join(f"{e.image_path}\t{e.task}\t{e.answer}" for e in examples).encode()).hexdigest()
    parts = gather_everywhere((digest, unreadable_images([e.image_path for e in examples], rank, world)))
    if len({d for d, _ in parts}) > 1:
        raise UserError("the processes read different training data (files changed while starting?); "
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
        raise UserError(f"none of the {len(self.examples)} training images decodes; first error: "
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
        log(f"{checkpoint} has no {PROGRESS_FILE}: examples_trained and samples_trained count from here")
        return Ledger(size)
    ledger = Ledger.from_json(json.loads(path.read_text()))
    if ledger.size != size:
        log(f"{path} counts {ledger.size} examples, this run has {size}: the counts start again")
        return Ledger(size)
    return ledger


# Stopping on a signal. Schedulers send SIGTERM at the time limit (Slurm then waits KillWait, 30 s by
# default, before SIGKILL); Ctrl-C sends SIGINT. Both ask for a checkpoint at the end of the current
# optimizer step, which Trainer writes from its normal save path, so resuming is exactly the normal resume.

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
    """(Trainer that keeps `ledger` and stops on `stop`'s signals, its callback whose `agreed` is the signal all
    processes stopped for). The classes are made here because transformers loads only when training starts
    (so `--help` is instant)."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class LedgerTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ledger.record(inputs["example_index"], inputs["decode_failures"])
            model_inputs = {k: v for k, v in inputs.items() if k not in BOOKKEEPING_KEYS}
            return super().training_step(model, model_inputs, num_items_in_batch)

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            """The bar only: RunCallback logs each step once, as a plain line."""

    class RunCallback(TrainerCallback):
        agreed = 0  # the signal all processes stopped for (set at a step end), 0 if none

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                log(f"training started at step {state.global_step} of {state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            # One plain line per log for batch-job log files (the progress bar is for terminals).
            if state.is_world_process_zero and logs and "loss" in logs:
                log(f"step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                    f"lr {logs.get('learning_rate', 0):.3g}, epoch {state.epoch:.2f}")

        def on_step_end(self, args, state, control, **kwargs):
            self.agreed = agreed_signal(stop.signum, args.device)
            if self.agreed:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            merged = merge_ledgers(gather_everywhere(ledger))  # every process takes part; rank 0 writes
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                files.write_text_atomic(checkpoint / PROGRESS_FILE, json.dumps(merged.to_json()))

    callback = RunCallback()
    trainer = LedgerTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                            callbacks=[callback])
    if trainer.pop_callback(ProgressCallback):
        trainer.add_callback(QuietProgress)
    trainer.pop_callback(PrinterCallback)
    return trainer, callback


def lora_model(model, r: int, alpha: int, dropout: float, load_in_4bit: bool, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # Non-reentrant checkpointing: the reentrant kind breaks DistributedDataParallel's gradient hooks.
    checkpointing = {"use_reentrant": False}
    if load_in_4bit:
        # QLoRA: fp32 norms and inputs that need grads, so gradients flow through the frozen 4-bit base.
        with quiet_library_deprecations():
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
    with quiet_library_deprecations():
        return get_peft_model(model, config)


def save_adapter(model, output_dir: str) -> None:
    """PEFT's save_pretrained into a temporary folder, then each file moved in whole."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter-"))
    try:
        model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~files.current_umask())  # as readable as the tool's other outputs
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
          max_length: int, hint: str) -> Trained:
    """Trainer.train on the examples: it changes `model`'s LoRA weights, nothing else it is given.

    SIGINT/SIGTERM stop it at the end of an optimizer step, after a checkpoint (Trained.stopped_by); a
    second one stops at once (signals.StopSignals), printing `hint`: how to continue from the latest checkpoint.
    """
    # Only rank 0 carries the counts of the steps before the resume, so merging never counts them twice.
    ledger = load_ledger(resume if training_args.process_index == 0 else None, len(examples))
    stop = StopSignals("at the end of this optimizer step, after saving a checkpoint",
                       distributed=training_args.world_size > 1, armed=True, hint=hint)
    trainer, callback = make_trainer(model, training_args,
                                     TrainDataset(examples, processor, "vicuna", language, max_length),
                                     Collator(processor.tokenizer.pad_token_id), ledger, stop)
    with stop, quiet_library_deprecations():
        result = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    return Trained(result.training_loss, state.global_step, state.max_steps, state.log_history,
                   merge_ledgers(gather_everywhere(ledger)), callback.agreed)
