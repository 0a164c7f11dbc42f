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
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from errors import UserError, first_line, log
from files import write_csv_atomic
from generation import generate_texts, generate_with_backoff
from images import list_images, make_loader
from journal import default_journal_path, open_journal
from model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ModelSpec, load_model, stop_token_ids
from shards import Shard, gather_to_rank0, merge_shard_records, process_group, shard_from

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


# ---------------------------------------------------------------------------------------------
# The run: everything between the image folder and the journal.
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
    if cfg.shard and cfg.shard.distributed:
        with process_group(cfg.model.device) as device:
            result = generate_into_journal(cfg, items, replace(cfg.model, device=device), model_bundle)
            parts = gather_to_rank0({"records": {i: result.records[i] for i in result.ids if i in result.records},
                                     "generated": result.generated, "interrupted": result.interrupted,
                                     "seconds": result.seconds})
        if parts is None:
            return result
        records: dict[str, dict] = {}
        for part in parts:
            records.update(part["records"])
        return RunResult(all_ids, records, result.journal_path, max(p["seconds"] for p in parts),
                         sum(p["generated"] for p in parts), any(p["interrupted"] for p in parts), writer=True)
    return generate_into_journal(cfg, items, cfg.model, model_bundle)


def generate_into_journal(cfg: RunConfig, items: list[tuple[str, str]], spec: ModelSpec,
                          model_bundle=None) -> RunResult:
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
            model, processor, device = model_bundle or load_model(spec)
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
    return RunResult(ids, journal.records, cfg.journal_path, time.perf_counter() - start, generated, interrupted,
                     writer=cfg.shard is None)


def merge_shards(cfg: RunConfig) -> RunResult:
    """--merge_shards: all shards' journals -> one result, refusing a missing or incomplete shard."""
    all_ids = [i for i, _ in run_items(cfg)]
    records = merge_shard_records(cfg.output_csv, cfg.checkpoint_dir, all_ids, cfg.task)
    log(f"merged the shards: {len(all_ids)} images")
    return RunResult(all_ids, records, default_journal_path(cfg.output_csv, cfg.checkpoint_dir).parent, 0.0, 0)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


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


def iter_rows(ids: list[str], records: dict[str, dict], convert: Callable[[str], str]) -> Iterator[list[str]]:
    for i in ids:
        rec = records.get(i)
        yield [i, convert(rec["text"]) if rec and not rec.get("error") else ""]
