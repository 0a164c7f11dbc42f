"""The engine's face, shared by generate_captions.py and generate_concepts.py: options -> run config
-> `run(cfg, source, writer)`.

Every method of both scripts is one pipeline (jjvmed/pipeline.py): a source makes a record per image
(generate into the journal, embed into the store, read a file again), a writer turns the records into
the output files, and the run does the rest once for all: outputs checked, images selected in the ID
list's order, locks, resume, shards, the 2026 check, the zip, the summary. The entry scripts own only
their task: arguments, and which source and writer each method is. torch and transformers are
imported inside the functions that need them, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jjvmed.errors import UserError, first_line
from jjvmed.generation import parse_batch_size
from jjvmed.model import DEFAULT_ADAPTER, DEFAULT_BASE_MODEL, ModelSpec, merge_by_default
from jjvmed.options import Parser, add_device_options
from jjvmed.pipeline import RunConfig, run
from jjvmed.prompts import LANGUAGES, MAX_NEW_TOKENS, PROMPT_TEMPLATES, resolve_template, task_prompt
from jjvmed.shards import shard_from
from jjvmed.sources import Generation
from jjvmed.submission import ID_LIST_HEADER_RULE

__all__ = ["Parser", "RunConfig", "run", "add_common_arguments", "config_from_args", "generation_from_args",
           "refuse_generation_options"]

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
    add_scale_options(parser.add_argument_group("scale-out (see README: several GPUs and machines)"), task)


def add_io_options(io, task: str) -> None:
    default_out = "results/captions.csv" if task == "caption" else "results/concepts.csv"
    io.add_argument("--image_dir", help="folder of images (jpg, jpeg, png, bmp, gif, tif, tiff, webp); "
                    "the image ID is the file name without its extension")
    io.add_argument("--output_csv", default=default_out, help="final CSV (default: %(default)s)")
    io.add_argument("--ids_csv", default=None, metavar="PATH",
                    help="the expected IDs in the order the platform wants them: a CSV whose first column lists "
                    f"them (the organisers' ID list or a ground-truth file); {ID_LIST_HEADER_RULE}. Rows follow it "
                    "exactly; listed IDs without an image are an error, images it does not list are skipped")
    io.add_argument("--zip", default=None, metavar="PATH",
                    help="also write the upload zip (only submission.csv inside) when the checks accept the file")
    io.add_argument("--limit", type=int, default=None, help="process only the first N images (a quick trial run)")


def add_checkpoint_options(ck) -> None:
    ck.add_argument("--checkpoint_dir", default=None,
                    help="folder for the journal of raw generations (default: beside --output_csv)")
    ck.add_argument("--checkpoint_interval", type=int, default=1,
                    help="fsync the journal every N batches; records are appended after every batch "
                    "(default: %(default)s)")
    ck.add_argument("--resume_from_checkpoint", default=None, metavar="auto|PATH",
                    help="continue an earlier run of this command: auto = what it left beside the output (the "
                    "journal; starts fresh if there is none), or the journal's PATH. Without it, an existing "
                    "journal is never overwritten (the run stops and says so)")
    ck.add_argument("--force_resume", action="store_true",
                    help="resume even if the journal was written with different settings")
    ck.add_argument("--overwrite", action="store_true",
                    help="discard an existing journal and start over (the embeddings file's vectors too)")


def add_model_options(model) -> None:
    model.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL,
                       help="hub ID or local folder of the LLaVA model (default: %(default)s)")
    model.add_argument("--adapter_repo", default=DEFAULT_ADAPTER,
                       help="hub ID or local folder of the LoRA adapter; 'none' runs the base model "
                       "(default: %(default)s)")
    model.add_argument("--lora_subfolder", default=None, help="subfolder of the adapter repo holding the adapter")
    model.add_argument("--merge_adapters", action=argparse.BooleanOptionalAction, default=None,
                       help="merge the LoRA weights into the base model: each decoding step then skips the "
                       "adapter's ~1,350 small extra operations (default: merged; not merged with --load_in_4bit "
                       "unless asked for, and then merged on unquantized weights, saved once, then quantized)")
    model.add_argument("--merged_cache_dir", default=None,
                       help="where merged unquantized models are kept for --merge_adapters --load_in_4bit "
                       "(default: ~/.cache/jj-vmed/merged)")
    model.add_argument("--load_in_4bit", action="store_true",
                       help="4-bit NF4 quantization with bitsandbytes (about 6 GB of GPU memory for the 8B model)")
    add_device_options(model, "the model", "spread over every visible GPU if CUDA is present, else the CPU")


def add_prompt_options(prompt) -> None:
    prompt.add_argument("--prompt_template", choices=["auto", *PROMPT_TEMPLATES], default="auto",
                        help="auto = vicuna (the adapter's training format) with an adapter, llama3 without "
                        "(default: %(default)s)")
    prompt.add_argument("--language", choices=LANGUAGES, default="es",
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


def add_scale_options(scale, task: str) -> None:
    scale.add_argument("--num_shards", type=int, default=None,
                       help="without a launcher (job arrays): split the sorted images into N shards ...")
    scale.add_argument("--shard_index", type=int, default=None, help="... and process shard i (0-based)")
    scale.add_argument("--merge_shards", action="store_true",
                       help="build the final CSVs from all shards' journals (no language model needed"
                       + ("; --method fused loads the vision tower for the embeddings" if task == "concepts" else "")
                       + "); refuses if a shard is missing or incomplete, or ran with other settings")


def parse_generation_kwargs(text: str | None, max_new_tokens: int) -> dict[str, Any]:
    """Greedy defaults with the user's JSON merged over them; unknown keys are refused."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if not text:
        return kwargs
    kwargs = {**kwargs, **user_generation_kwargs(text)}
    check_generation_settings(kwargs, "--generation_kwargs")
    return kwargs


def user_generation_kwargs(text: str | None) -> dict[str, Any]:
    """The settings --generation_kwargs gives itself (no defaults), their names checked."""
    if not text:
        return {}
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
    return user


def check_generation_settings(kwargs: dict[str, Any], what: str) -> None:
    """The settings generate() will get, checked as transformers checks them (strictly: a setting that would be
    ignored is refused too), plus counts that it divides by: one line now instead of a traceback after the
    model has loaded."""
    import warnings

    from transformers import GenerationConfig
    from transformers.utils import logging as transformers_logging

    for name in ("num_beams", "num_return_sequences", "max_new_tokens"):
        value = kwargs.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{what}: {name} must be at least 1, got {value!r}")
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its own warning about the same problem would come first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            GenerationConfig(**kwargs).validate(strict=True)
    except (ValueError, TypeError) as e:
        # transformers lists its problems one per line, after a title line
        problems = [line.strip(" -") for line in str(e).splitlines() if line.strip().startswith("- ")]
        raise UserError(f"{what}: {'; '.join(problems) or first_line(e)}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


# What only text generation uses. A run that generates nothing (knn and probe concepts, knn captions,
# --from_natural_csv) refuses them when given, by refuse_generation_options: one rule, one message.
GENERATION_ONLY = ("adapter_repo", "lora_subfolder", "merge_adapters", "merged_cache_dir", "load_in_4bit",
                   "prompt_template", "language", "prompt", "compile", "max_new_tokens", "generation_kwargs", "seed",
                   "checkpoint_dir", "checkpoint_interval", "force_resume")


def refuse_generation_options(parser: Parser, names: tuple[str, ...], run: str) -> None:
    """One line naming every option of `names` given on the command line (even with its default value), for a
    `run` ("--method knn") that generates no text."""
    given = [f"--{name}" for name in parser.given() if name in names]
    if given:
        raise UserError(f"{', '.join(given)}: only for generated text; {run} generates none: drop "
                        f"{'it' if len(given) == 1 else 'them'}")


def check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


# ---------------------------------------------------------------------------------------------
# Run configuration
# ---------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace, task: str) -> RunConfig:
    """Validate the options every run has and build its configuration (nothing loaded yet)."""
    check_positive(checkpoint_interval=args.checkpoint_interval, limit=args.limit)
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        raise UserError(f"--image_dir {args.image_dir} is not a folder")
    shard = shard_from(args.num_shards, args.shard_index, args.merge_shards)
    if shard and args.resume_from_checkpoint not in (None, "auto"):
        raise UserError("with shards, resume with --resume_from_checkpoint auto (each shard has its journal)")
    return RunConfig(task=task, output_csv=args.output_csv, image_dir=args.image_dir,
                     ids_csv=args.ids_csv, limit=args.limit, zip_path=args.zip, checkpoint_dir=args.checkpoint_dir,
                     checkpoint_interval=args.checkpoint_interval, resume=args.resume_from_checkpoint,
                     force_resume=args.force_resume, overwrite=args.overwrite, shard=shard, merge=args.merge_shards)


def generation_from_args(args: argparse.Namespace, task: str) -> Generation:
    """What the model is and how it generates, from the model, prompt and generation options."""
    check_positive(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not args.image_dir:
        raise UserError("--image_dir is required")
    adapter = None if str(args.adapter_repo).lower() in ("none", "") else args.adapter_repo
    template = resolve_template(args.prompt_template, adapter)
    spec = ModelSpec(base_model_path=args.base_model_path, adapter=adapter, lora_subfolder=args.lora_subfolder,
                     merge_adapters=merge_by_default(adapter, args.load_in_4bit) if args.merge_adapters is None
                     else args.merge_adapters, load_in_4bit=args.load_in_4bit, device=args.device,
                     dtype=args.dtype, merged_cache_dir=args.merged_cache_dir)
    return Generation(task=task, model=spec, prompt=task_prompt(task, template, args.language, args.prompt),
                      gen_kwargs=parse_generation_kwargs(args.generation_kwargs, args.max_new_tokens),
                      batch_size=args.batch_size, compile=args.compile, num_workers=args.num_workers, seed=args.seed)
