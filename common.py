"""The JJ-VMed engine shared by generate_captions.py and generate_concepts.py.

A run is a straight line (`run`):
    configure -> list and order the images -> lock and open the journal -> load the model
    -> generate batches -> gather the shards -> rows -> write the CSVs -> check them -> summary.

The raw text of every image goes to the journal (journal.py) before anything else happens to it,
so the CSVs can always be rebuilt from it. The entry scripts own only their task: arguments, prompt,
post-processing and output columns. torch and transformers are imported inside the functions that
need them, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from jjvmed.errors import UserError, exit_at_once, first_line, log
from jjvmed.files import check_writable, lock_exclusive, write_csv_atomic
from jjvmed.generation import auto_batch_size, generate_batches, parse_batch_size
from jjvmed.images import scan_folder
from jjvmed.journal import default_journal_path, open_journal
from jjvmed.model import (
    DEFAULT_ADAPTER,
    DEFAULT_BASE_MODEL,
    ModelSpec,
    load_model,
    merge_by_default,
    resolve_device_and_dtype,
)
from jjvmed.prompts import MAX_NEW_TOKENS, PROMPT_TEMPLATES, resolve_template, task_prompt
from jjvmed.records import Record
from jjvmed.shards import Shard, gather_to_rank0, merge_shard_records, process_group, shard_from

SUBMISSION_TASK = {"caption": "captions", "concepts": "concepts"}  # submission.py's names for the tasks

# ---------------------------------------------------------------------------------------------
# Command line: options shared by both scripts, grouped by purpose.
# ---------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """Add every option both generate scripts share, in groups. `task` picks the defaults."""
    add_io_options(parser.add_argument_group("input and output"), task)
    add_checkpoint_options(parser.add_argument_group("checkpoint and resume"))
    add_model_options(parser.add_argument_group("model"))
    add_prompt_options(parser.add_argument_group("prompt"))
    add_generation_options(parser.add_argument_group("generation"), task)
    add_scale_options(parser.add_argument_group("scale-out (see README: several GPUs and machines)"))


def add_io_options(io, task: str) -> None:
    default_out = "results/captions.csv" if task == "caption" else "results/concepts.csv"
    io.add_argument("--image_dir", help="folder of images (jpg, jpeg, png, bmp, gif, tif, tiff, webp); "
                    "the image ID is the file name without its extension")
    io.add_argument("--output_csv", default=default_out, help="final CSV (default: %(default)s)")
    io.add_argument("--ids_csv", default=None, metavar="PATH",
                    help="the expected IDs in the order the platform wants them: a CSV whose first column lists "
                    "them (the organisers' ID list or a ground-truth file; header skipped). Rows follow it exactly; "
                    "listed IDs without an image are an error, images it does not list are skipped")
    io.add_argument("--zip", default=None, metavar="PATH",
                    help="also write the upload zip (only submission.csv inside) when the checks accept the file")
    io.add_argument("--limit", type=int, default=None, help="process only the first N images (a quick trial run)")


def add_checkpoint_options(ck) -> None:
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


def add_model_options(model) -> None:
    model.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL,
                       help="hub ID or local folder of the LLaVA model (default: %(default)s)")
    model.add_argument("--adapter_repo", default=DEFAULT_ADAPTER,
                       help="hub ID or local folder of the LoRA adapter; 'none' runs the base model "
                       "(default: %(default)s)")
    model.add_argument("--lora_subfolder", default=None, help="subfolder of the adapter repo holding the adapter")
    model.add_argument("--merge_adapters", action=argparse.BooleanOptionalAction, default=None,
                       help="merge the LoRA weights into the base model: each decoding step then skips the "
                       "adapter's ~900 small extra operations (default: merged; not merged with --load_in_4bit "
                       "unless asked for, and then merged on unquantized weights, saved once, then quantized)")
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


def add_prompt_options(prompt) -> None:
    prompt.add_argument("--prompt_template", choices=["auto", *PROMPT_TEMPLATES], default="auto",
                        help="auto = vicuna (the adapter's training format) with an adapter, llama3 without "
                        "(default: %(default)s)")
    prompt.add_argument("--language", choices=["es", "en"], default="es",
                        help="language of the built-in instruction; es is what the adapter was trained on "
                        "(default: %(default)s)")
    prompt.add_argument("--prompt", default=None, help="your own instruction instead of the built-in one")


def add_generation_options(gen, task: str) -> None:
    gen.add_argument("--batch_size", type=parse_batch_size, default=None, metavar="N|auto",
                     help="images per generate call, or auto: on a GPU the largest batch that fits (measured at "
                     "the start), on CPU 16; halved automatically on CUDA out-of-memory (default: auto)")
    gen.add_argument("--compile", action="store_true",
                     help="static KV cache and a torch.compile'd decoding step: much faster on a GPU after a "
                     "minute or two of compiling; slow on CPU. Same greedy text")
    gen.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS[task],
                     help="longest answer in tokens (default: %(default)s)")
    gen.add_argument("--generation_kwargs", default=None, metavar="JSON",
                     help='extra generate() settings merged over the greedy defaults, e.g. '
                     '\'{"num_beams": 3, "repetition_penalty": 1.1}\'')
    gen.add_argument("--seed", type=int, default=0, help="random seed, for sampling (default: %(default)s)")
    gen.add_argument("--num_workers", type=int, default=None,
                     help="processes decoding images while the model generates; 0 decodes in the main process "
                     "(default: up to 4 with a GPU; on CPU half the cores, the model gets the other half)")


def add_scale_options(scale) -> None:
    scale.add_argument("--num_shards", type=int, default=None,
                       help="without a launcher (job arrays): split the sorted images into N shards ...")
    scale.add_argument("--shard_index", type=int, default=None, help="... and process shard i (0-based)")
    scale.add_argument("--merge_shards", action="store_true",
                       help="build the final CSVs from all shards' journals (no language model needed; --method fused "
                       "loads the vision tower for the embeddings); refuses if a shard "
                       "is missing or incomplete")


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
    return {**kwargs, **user}


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


# ---------------------------------------------------------------------------------------------
# Run configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    task: str  # caption | concepts
    image_dir: str
    output_csv: str
    model: ModelSpec
    prompt: str  # the full prompt text, <image> included
    gen_kwargs: dict
    batch_size: int | None = None  # None: auto
    compile: bool = False  # static cache + compiled decoding step
    num_workers: int | None = None  # None: see cpu_split()
    seed: int = 0
    limit: int | None = None
    ids_csv: str | None = None
    zip_path: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 1
    resume: str | None = None  # None | "auto" | a journal path
    force_resume: bool = False
    overwrite: bool = False
    shard: Shard | None = None
    merge: bool = False  # --merge_shards: build the CSVs from the shards' journals
    other_outputs: tuple[str, ...] = ()  # task files written beside the output (format A), checked up front

    @property
    def journal_path(self) -> Path:
        if self.resume not in (None, "auto"):
            return Path(self.resume)
        return default_journal_path(self.output_csv, self.checkpoint_dir, self.shard.suffix if self.shard else "")

    @property
    def writes_csv(self) -> bool:
        """One process writes the CSVs: a plain run, the merge, or rank 0 under a launcher."""
        return self.shard is None or self.shard.writes_csv

    def settings(self, dtype: str) -> dict:
        """What decides the generated text; a resume with different settings is refused.

        `dtype` is the resolved one, so `--dtype auto` and the dtype it picks count as the same.
        """
        model = {k: v for k, v in asdict(self.model).items() if k not in ("device", "merged_cache_dir", "dtype")}
        return {"task": self.task, **model, "dtype": dtype, "prompt": self.prompt, "generation": self.gen_kwargs}


def config_from_args(args: argparse.Namespace, task: str, other_outputs: tuple[str, ...] = ()) -> RunConfig:
    """Validate the shared options and build the run configuration (no model loaded yet)."""
    check_positive(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   checkpoint_interval=args.checkpoint_interval, limit=args.limit)
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not args.image_dir:
        raise UserError("--image_dir is required")
    if not Path(args.image_dir).is_dir():
        raise UserError(f"--image_dir {args.image_dir} is not a folder")
    adapter = None if str(args.adapter_repo).lower() in ("none", "") else args.adapter_repo
    template = resolve_template(args.prompt_template, adapter)
    shard = shard_from(args.num_shards, args.shard_index, args.merge_shards)
    if shard and args.resume_from_checkpoint not in (None, "auto"):
        raise UserError("with shards, resume with --resume_from_checkpoint auto (each shard has its journal)")
    spec = ModelSpec(base_model_path=args.base_model_path, adapter=adapter, lora_subfolder=args.lora_subfolder,
                     merge_adapters=merge_by_default(adapter, args.load_in_4bit) if args.merge_adapters is None
                     else args.merge_adapters, load_in_4bit=args.load_in_4bit, device=args.device,
                     dtype=args.dtype, merged_cache_dir=args.merged_cache_dir)
    return RunConfig(task=task, image_dir=args.image_dir, output_csv=args.output_csv, model=spec,
                     prompt=task_prompt(task, template, args.language, args.prompt),
                     gen_kwargs=parse_generation_kwargs(args.generation_kwargs, args.max_new_tokens),
                     batch_size=args.batch_size, compile=args.compile, num_workers=args.num_workers, seed=args.seed,
                     limit=args.limit, ids_csv=args.ids_csv, zip_path=args.zip, checkpoint_dir=args.checkpoint_dir,
                     checkpoint_interval=args.checkpoint_interval, resume=args.resume_from_checkpoint,
                     force_resume=args.force_resume, overwrite=args.overwrite, shard=shard, merge=args.merge_shards,
                     other_outputs=other_outputs)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The images of the run, in output order, and what was left out of it."""

    items: list[tuple[str, str]]  # (ID, path)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # why -> names

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.items]


def select_images(image_dir: str, ids_csv: str | None, limit: int | None) -> Selection:
    """The run's images: the folder's in natural ID order, or exactly the order of --ids_csv."""
    scan = scan_folder(image_dir)
    skipped = dict(scan.skipped)
    items = scan.items
    if ids_csv:
        from jjvmed.submission import in_id_list_order

        items, extra = in_id_list_order(items, ids_csv, f"image in {image_dir}")
        if extra:
            skipped["images not in --ids_csv"] = extra
    if not items:
        from jjvmed.images import list_images

        list_images(image_dir)  # raises the "no images" error with its hints
    return Selection(items[:limit] if limit else items, skipped)


@dataclass(frozen=True)
class RunResult:
    ids: list[str]  # every image ID of the run, in output order
    records: dict[str, Record]
    journal_path: Path
    seconds: float
    generated: int  # images generated by this invocation
    stopped: int | None = None  # the signal that stopped the run early, if one did
    batch_size: int | None = None  # the batch size used (what auto chose), when this invocation generated
    generating_seconds: float = 0.0  # of `seconds`, those spent generating (not loading the model)

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [(i, self.records[i].error) for i in self.ids if i in self.records and not self.records[i].ok]

    @property
    def missing(self) -> int:
        return sum(1 for i in self.ids if i not in self.records)


def run(cfg: RunConfig, write_outputs: Callable[[list[str], dict[str, Record]], list[Path]],
        model_bundle=None) -> int:
    """Everything between the image folder and the checked submission; returns the exit code."""
    for path in (cfg.output_csv, *cfg.other_outputs, cfg.zip_path):
        if path and cfg.writes_csv:
            check_writable(path, "output")
    if cfg.zip_path:
        from jjvmed.submission import check_zip_path

        check_zip_path(cfg.zip_path)
    if not cfg.merge:
        check_writable(cfg.journal_path, "checkpoint journal")
    selection = select_images(cfg.image_dir, cfg.ids_csv, cfg.limit)
    try:
        with ExitStack() as stack:
            if cfg.writes_csv:
                stack.enter_context(lock_exclusive(Path(cfg.output_csv)))
            result = merge_shards(cfg, selection) if cfg.merge else generate_run(cfg, selection, model_bundle)
            if not cfg.writes_csv or result.stopped is not None:
                return finish_run(cfg, selection, result, [], accepted=True)
            return write_and_check(cfg, selection, result, write_outputs)
    except OSError as e:
        raise os_failure(e) from None
    except RuntimeError as e:
        # torch's SIGCHLD handler raises this wherever the main thread is when a worker dies
        if "DataLoader worker" not in str(e):
            raise
        raise worker_died(e) from None


def write_and_check(cfg: RunConfig, selection: Selection, result: RunResult,
                    write_outputs: Callable[[list[str], dict[str, Record]], list[Path]]) -> int:
    outputs = write_outputs(result.ids, result.records)
    # Without CUI mapping a concepts run writes format A only: nothing to submit, nothing to check.
    submission = Path(cfg.output_csv) in outputs
    accepted = check_submission(cfg.task, cfg.output_csv, result.ids) if submission else True
    if accepted and submission and cfg.zip_path:
        from jjvmed.submission import write_zip

        outputs.append(write_zip(cfg.output_csv, cfg.zip_path))
    return finish_run(cfg, selection, result, outputs, accepted)


def os_failure(error: OSError) -> UserError:
    """Disk full and friends: one line with what to do; the journal keeps every finished batch."""
    resume = "then rerun the same command with --resume_from_checkpoint auto; finished batches are kept"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"disk full while writing {error.filename or 'the results'}: free some space, {resume}")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {error.filename}: {error.strerror}; fix the permissions, {resume}")
    return UserError(f"{error.strerror or error} ({error.filename or 'no file name'}); {resume}")


def generate_run(cfg: RunConfig, selection: Selection, model_bundle=None) -> RunResult:
    """This process's share: open the journal, generate what it lacks, gather the shards."""
    items = cfg.shard.take(selection.items) if cfg.shard else selection.items
    if not (cfg.shard and cfg.shard.distributed):
        return generate_into_journal(cfg, items, cfg.model, model_bundle)
    with process_group(cfg.model.device) as device:
        mine = generate_into_journal(cfg, items, replace(cfg.model, device=device), model_bundle)
        parts = gather_to_rank0({"records": {i: mine.records[i] for i in mine.ids if i in mine.records},
                                 "generated": mine.generated, "stopped": mine.stopped, "seconds": mine.seconds,
                                 "generating": mine.generating_seconds})
    if parts is None:
        return mine
    records: dict[str, Record] = {}
    for part in parts:
        records.update(part["records"])
    stopped = next((p["stopped"] for p in parts if p["stopped"] is not None), None)
    return RunResult(selection.ids, records, mine.journal_path, max(p["seconds"] for p in parts),
                     sum(p["generated"] for p in parts), stopped, mine.batch_size, max(p["generating"] for p in parts))


def generate_into_journal(cfg: RunConfig, items: list[tuple[str, str]], spec: ModelSpec,
                          model_bundle=None) -> RunResult:
    ids = [i for i, _ in items]
    _, dtype = resolve_device_and_dtype(spec.device, spec.dtype)
    remedy = "give this run another --checkpoint_dir" if cfg.resume in (None, "auto") else "resume another journal"
    with lock_exclusive(cfg.journal_path, remedy), StopSignals() as stop:
        journal = open_journal(cfg.journal_path, cfg.settings(str(dtype).removeprefix("torch.")),
                               os.path.abspath(cfg.image_dir), dict(items), cfg.resume, cfg.force_resume,
                               cfg.overwrite, cfg.checkpoint_interval)
        todo = [(i, p) for i, p in items if not (i in journal.records and journal.records[i].ok)]
        start = time.perf_counter()
        generated, batch_size, generating = 0, None, 0.0
        try:
            if todo:
                generated, batch_size, generating = generate_todo(cfg, todo, spec, journal, stop, model_bundle)
        finally:
            journal.close()
        return RunResult(ids, journal.records, cfg.journal_path, time.perf_counter() - start, generated,
                         stop.signum, batch_size, generating)


def generate_todo(cfg: RunConfig, todo: list[tuple[str, str]], spec: ModelSpec, journal, stop: StopSignals,
                  model_bundle=None) -> tuple[int, int, float]:
    """Load the model and append the records of every batch to the journal; returns how many were written,
    the batch size and the seconds spent generating (model loading and the batch-size probe left out)."""
    import torch
    from tqdm import tqdm

    from jjvmed.images import make_loader

    torch.manual_seed(cfg.seed)
    model, processor, device = model_bundle or load_model(spec)
    batch_size = cfg.batch_size or auto_batch_size(model, processor, cfg.prompt, cfg.gen_kwargs, len(todo),
                                                   static_cache=cfg.compile).size
    generated = 0
    start = time.perf_counter()
    with cpu_split(device.type, cfg.num_workers) as workers:
        loader = make_loader(todo, processor, cfg.prompt, batch_size, workers, pin_memory=device.type == "cuda")
        with tqdm(total=len(todo), unit="img", desc=cfg.task, dynamic_ncols=True, file=sys.stderr) as bar:
            stop.armed = True
            try:
                for records in generate_batches(model, processor, guarded(loader), cfg.gen_kwargs,
                                                "inductor" if cfg.compile else None, batch_size):
                    journal.append(records, loader.digests)
                    for r in records:
                        if not r.ok:
                            bar.write(f"warning: {r.id}: {r.error}", file=sys.stderr)
                    generated += len(records)
                    bar.update(len(records))
                    if stop.signum is not None:
                        break
            finally:
                stop.armed = False
    return generated, batch_size, time.perf_counter() - start


def guarded(loader) -> Iterator:
    """The loader's batches; a failure of the loader itself becomes one line with what to do.

    Bad images never raise out of the dataset (they come back as failures), so anything raised
    here is the machinery: a worker killed for lack of memory, /dev/shm full.
    """
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            raise worker_died(e) from None
        yield batch


def worker_died(error: BaseException) -> UserError:
    return UserError(f"an image-decoding worker died ({first_line(error)}; killed for lack of memory?): rerun with "
                     "--resume_from_checkpoint auto and fewer --num_workers; finished batches are kept")


@contextmanager
def cpu_split(device_type: str, num_workers: int | None) -> Iterator[int]:
    """Decode workers, and on CPU the model's threads: the two share the cores. Yields the workers.

    On a GPU the workers only feed it, so they get up to 4 cores. On CPU, image decoding and the
    model compete; the model's threads are set to the cores the workers leave, because
    oversubscribed cores made both slower (benchmarks/throughput.py). The thread count is
    restored however the run ends.
    """
    import torch

    cores = os.cpu_count() or 1
    if num_workers is None:
        num_workers = min(4, max(1, cores - 1)) if device_type == "cuda" else max(1, cores // 2)
    before = torch.get_num_threads()
    if device_type == "cpu" and num_workers > 0:
        torch.set_num_threads(max(1, cores - num_workers))
    try:
        yield num_workers
    finally:
        torch.set_num_threads(before)


class StopSignals:
    """Ctrl-C (SIGINT) and a scheduler's SIGTERM: stop after the current batch, keep everything.

    While batches run (`armed`), the first signal asks the loop to stop after the batch in hand; a
    second one, or one outside the loop, exits at once (errors.exit_at_once). Either way the journal
    holds every finished batch, and the exit code is 128 + the signal (130, 143).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.armed = False
        self.previous: dict = {}

    def handler(self, signum, frame):
        if not self.armed or self.signum is not None:
            exit_at_once(signum, frame)
        self.signum = signum
        log(f"\n{signal.Signals(signum).name}: stopping after the current batch (again to stop now)")

    def __enter__(self) -> StopSignals:
        self.previous = {s: signal.signal(s, self.handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, previous)


def merge_shards(cfg: RunConfig, selection: Selection) -> RunResult:
    """--merge_shards: all shards' journals -> one result, refusing a missing or incomplete shard."""
    _, dtype = resolve_device_and_dtype(cfg.model.device, cfg.model.dtype)
    records = merge_shard_records(cfg.output_csv, cfg.checkpoint_dir, selection.ids,
                                  cfg.settings(str(dtype).removeprefix("torch.")), os.path.abspath(cfg.image_dir),
                                  dict(selection.items))
    log(f"merged the shards: {len(selection.ids)} images")
    return RunResult(selection.ids, records, default_journal_path(cfg.output_csv, cfg.checkpoint_dir).parent, 0.0, 0)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def answer_rows(ids: list[str], records: dict[str, Record], convert: Callable[[str], str]) -> Iterator[list[str]]:
    """(ID, converted answer) per image in output order; failed or missing images get an empty answer."""
    for i in ids:
        record = records.get(i)
        yield [i, convert(record.text) if record and record.ok else ""]


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
    """Run the platform's 2026 pre-check on a file this run wrote (IDs and their order too); log what it says."""
    from jjvmed.submission import log_report, validate_file

    report = validate_file(SUBMISSION_TASK.get(task, task), path, ids)
    log_report(report, str(path), limit=10)
    return report.accepted


def finish_run(cfg: RunConfig, selection: Selection, result: RunResult, outputs: list[Path], accepted: bool) -> int:
    """Errors file, summary, exit code: 128 + signal after a stop, 1 if the checks rejected the file."""
    failures = result.failures
    errors_file = write_errors(cfg.output_csv, failures) if cfg.writes_csv and result.stopped is None else None
    before = len(result.ids) - result.missing - result.generated
    # The rate counts generation only, as the progress bar does: loading an 8B model takes minutes.
    rate = result.generated / result.generating_seconds if result.generating_seconds > 0 else 0.0
    lines = [f"images: {len(result.ids)} (generated now: {result.generated}, done before: {max(before, 0)}"
             + (f", not done yet: {result.missing}" if result.missing else "") + ")",
             f"failures: {len(failures)}" + (f" (listed in {errors_file})" if errors_file else ""),
             f"time: {result.seconds:.1f} s ({result.seconds - result.generating_seconds:.1f} s loading), "
             f"{rate:.2f} images/s while generating"
             + (f", batch size {result.batch_size}{' (auto)' if cfg.batch_size is None else ''}"
                f"{', compiled' if cfg.compile else ''}" if result.batch_size else ""),
             f"journal: {result.journal_path}"]
    for why, names in selection.skipped.items():
        lines.append(f"skipped, {why}: {len(names)} ({', '.join(repr(n) for n in names[:3])}"
                     f"{', ...' if len(names) > 3 else ''})")
    if result.stopped is not None:
        lines.append("stopped early: rerun the same command with --resume_from_checkpoint auto to continue")
    elif not cfg.writes_csv:
        lines.append("this process's share is done; rank 0 writes the CSVs" if cfg.shard and cfg.shard.distributed
                     else "this shard is done; when every shard is, build the CSVs with the same command, "
                     "--merge_shards instead of --num_shards/--shard_index")
    else:
        lines += [f"wrote: {p}" for p in outputs]
    log("\n".join(lines))
    if result.stopped is not None:
        return 128 + result.stopped
    return 0 if accepted else 1
