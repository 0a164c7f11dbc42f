"""LoRA fine-tuning of LLaVA-LLaMA-3-8B on ROCOv2-style data: the adapter the generate scripts load.

    python finetune.py --image_dir /data/train/images --train_captions train_captions.csv \\
        --train_concepts train_concepts.csv --cui_mapping_file cui_mapping.csv \\
        --valid_image_dir /data/valid/images --valid_captions valid_captions.csv \\
        --valid_concepts valid_concepts.csv --output_dir adapters/run1 --load_in_4bit
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
import json
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from jjvmed import errors, files, prompts
from jjvmed.cui_mapper import CuiMapper, load_mapper
from jjvmed.generation import generate_batches
from jjvmed.images import id_sort_key, make_loader
from jjvmed.model import DEFAULT_BASE_MODEL, load_base_model, load_processor, resolve_device_and_dtype
from jjvmed.options import Parser, add_device_options
from jjvmed.shards import gather_everywhere
from jjvmed.training import (
    ERRORS_FILE,
    IMAGE_TOKENS,
    MIN_MAX_LENGTH,
    NO_IMAGE,
    Example,
    Trained,
    build_examples,
    check_training_images,
    lora_model,
    loss_curve_png,
    save_adapter,
    train,
)

SUMMARY_FILE = "finetune_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
# Schedulers transformers builds from a name alone (the others need settings this script does not take).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


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


def write_errors_file(output_dir: str, failures: dict[str, str]) -> Path:
    """ID,Error for every training image that could not be used (header only if none)."""
    rows = [[i, failures[i]] for i in sorted(failures, key=id_sort_key)]
    return files.write_csv_atomic(Path(output_dir) / ERRORS_FILE, ["ID", "Error"], rows)


def build_parser() -> Parser:
    p = Parser(description="LoRA fine-tuning of LLaVA-LLaMA-3-8B for ImageCLEFmedical Caption "
                                "(the recipe of the published JJ-VMed adapter by default). Several GPUs: start it "
                                "with torchrun or accelerate launch.")
    data = p.add_argument_group("data")
    data.add_argument("--image_dir", required=True,
                      help="training images; ID = file name without extension (required)")
    data.add_argument("--train_captions", metavar="CSV",
                      help="ID,Caption file: one caption example per image (default: none)")
    data.add_argument("--train_concepts", metavar="CSV",
                      help="ID,CUIs file: one concept example per image; needs --cui_mapping_file (default: none)")
    data.add_argument("--cui_mapping_file",
                      help="CUI,Canonical name file that turns CUIs into the answer's names (default: none)")
    data.add_argument("--valid_image_dir",
                      help="validation images, generated and scored after training (default: none, no validation)")
    data.add_argument("--valid_captions", metavar="CSV",
                      help="ID,Caption ground truth for --valid_image_dir (default: none)")
    data.add_argument("--valid_concepts", metavar="CSV",
                      help="ID,CUIs ground truth for --valid_image_dir (default: none)")
    data.add_argument("--eval_images", type=int, default=50,
                      help="validation images generated and scored after training; 0 skips it (default: %(default)s)")
    data.add_argument("--language", choices=prompts.LANGUAGES, default="es",
                      help="instruction language; es = the published adapter's (default: %(default)s)")
    data.add_argument("--max_length", type=int, default=1024,
                      help=f"tokens per example, the {IMAGE_TOKENS} image tokens and the prompt included; at least "
                      f"{MIN_MAX_LENGTH} (default: %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL,
                       help="hub ID or local folder of the LLaVA base model (default: %(default)s)")
    model.add_argument("--load_in_4bit", action="store_true",
                       help="QLoRA: train LoRA on a 4-bit NF4 base, about 6 GB for the 8B model (default: off)")
    add_device_options(model, "training", "one GPU per process (torchrun) if CUDA is present, else the CPU")
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
                       help=f"learning-rate schedule: {', '.join(LR_SCHEDULERS)} (default: %(default)s)")
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
    train.add_argument("--resume_from_checkpoint", default=None, metavar="auto|PATH",
                       help="continue an earlier run of this command: auto = what it left in --output_dir (the "
                       "latest Trainer checkpoint; starts at step 0 if there is none), or a checkpoint-N folder's "
                       "PATH (default: start fresh)")
    for old, new in (("--captions_csv", "--train_captions"), ("--concepts_csv", "--train_concepts"),
                     ("--valid_captions_csv", "--valid_captions"), ("--valid_concepts_csv", "--valid_concepts")):
        p.rename(old, new)
    return p


def read_validation_truth(args: argparse.Namespace) -> dict[str, dict]:
    """task -> the validation ground truth, read as the official scorer reads it ('ID,' is the concept ''),
    before anything loads, so a bad file fails in a second rather than after training. Empty without
    validation."""
    from jjvmed.submission import caption_pairs, concept_pairs, read_rows

    if not (args.valid_image_dir and args.eval_images > 0):
        return {}
    truth = {}
    if args.valid_captions:
        truth["caption"] = caption_pairs(read_rows(args.valid_captions))
    if args.valid_concepts:
        truth["concepts"] = concept_pairs(read_rows(args.valid_concepts))
    return truth


def evaluate_adapter(model, processor, args, mapper: CuiMapper | None, truth: dict[str, dict]) -> dict:
    """Generate for the first --eval_images images of each validation ground truth and score them with
    scores.py, as the generate scripts' CSVs would be scored.

    Uses the generation core and the prompts, token limits and post-processing of the generate
    scripts; the answers are scored as their CSV reads back (no CUI is the row 'ID,', the concept ''),
    over the ground truth's images, including those whose CUIs the mapping file does not know.
    """
    from jjvmed import scores
    from jjvmed.images import list_images
    from jjvmed.prompts import parse_answer

    images = dict(list_images(args.valid_image_dir))
    results: dict = {}
    for task, gt_all in truth.items():
        chosen = [i for i in sorted(gt_all, key=id_sort_key) if gt_all[i] and i in images][: args.eval_images]
        if not chosen:
            continue
        prompt = prompts.build_prompt("vicuna", prompts.INSTRUCTIONS[(task, args.language)],
                                     prompts.ANSWER_PREFIXES.get((task, args.language), ""))
        loader = make_loader([(i, images[i]) for i in chosen], processor, prompt, args.batch_size, 0)
        gen_kwargs = {"max_new_tokens": prompts.MAX_NEW_TOKENS[task], "do_sample": False, "num_beams": 1}
        texts = {r.id: r.text for records in generate_batches(model, processor, loader, gen_kwargs) for r in records}
        gt = {i: gt_all[i] for i in chosen}
        if task == "caption":
            summary, _ = scores.caption_scores(gt, {i: prompts.clean_caption(texts.get(i) or "") for i in chosen})
            results["caption_rouge1"] = summary["rouge1"]
        else:
            cuis = {i: mapper.map_phrases(parse_answer(texts.get(i) or "", mapper))[0] for i in chosen}
            summary, _ = scores.concept_scores(gt, {i: tuple(c) if c else ("",) for i, c in cuis.items()})
            results["concepts_f1"] = summary["f1"]
        results[f"{task}_images"] = len(chosen)
    return results


def check_options(args: argparse.Namespace) -> None:
    """The options that would otherwise fail only once the model is loaded, or after training: one line now."""
    for name in ("batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha", "logging_steps", "save_steps"):
        if getattr(args, name) < 1:
            raise errors.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "eval_images"):
        if getattr(args, name) < 0:
            raise errors.UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not args.learning_rate > 0 or not args.epochs > 0:
        raise errors.UserError("--learning_rate and --epochs must be more than 0")
    for name in ("lora_dropout", "warmup_ratio"):
        if not 0 <= getattr(args, name) < 1:
            raise errors.UserError(f"--{name} must be from 0 up to (not including) 1, got {getattr(args, name)}")
    if args.max_length < MIN_MAX_LENGTH:
        raise errors.UserError(f"--max_length {args.max_length} would cut into the {IMAGE_TOKENS} image tokens that "
                               f"open every example, before its prompt and answer: give at least {MIN_MAX_LENGTH}")
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise errors.UserError(f"--lr_scheduler {args.lr_scheduler} is not one of {', '.join(LR_SCHEDULERS)}")
    if args.valid_concepts and args.valid_image_dir and args.eval_images > 0 and not args.cui_mapping_file:
        raise errors.UserError("--valid_concepts needs --cui_mapping_file to turn the generated answers into CUIs")


# The steps of a run, in the order main() takes them: read the data, start the processes, drop the
# examples whose images cannot be read, load the model with LoRA, train, then (rank 0 only) save the
# adapter, score it on the validation images, and write the summary and the loss curve.

def read_training_data(image_dir: str, captions_csv: str | None, concepts_csv: str | None,
                       cui_mapping_file: str | None, language: str
                       ) -> tuple[CuiMapper | None, list[Example], Counter, dict[str, str]]:
    """The CUI mapper (None without a mapping file), the training examples, the data problems counted, and
    ID -> why for the IDs the CSVs name that have no image."""
    if not captions_csv and not concepts_csv:
        raise errors.UserError("give --train_captions and/or --train_concepts")
    if concepts_csv and not cui_mapping_file:
        raise errors.UserError("--train_concepts needs --cui_mapping_file to turn CUIs into names")
    # Read once: its names make the training answers and its index maps the validation answers.
    mapper = load_mapper(cui_mapping_file) if cui_mapping_file else None
    names = mapper.names if mapper else {}
    examples, problems, no_image = build_examples(image_dir, captions_csv, concepts_csv, names, language)
    return mapper, examples, problems, no_image


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


def drop_unreadable(examples: list[Example], problems: Counter, no_image: dict[str, str], output_dir: str,
                    rank: int, world: int, say: Callable[[str], None]) -> tuple[list[Example], dict[str, str]]:
    """The examples whose images pass the header check, and image ID -> error for the others.

    The unreadable images and the IDs without an image are listed in the errors file now, so the list is
    there while training runs.
    """
    started = time.monotonic()
    bad_paths = check_training_images(examples, rank, world)
    unreadable = {e.image_id: bad_paths[e.image_path] for e in examples if e.image_path in bad_paths}
    usable = [e for e in examples if e.image_path not in bad_paths]
    counts = Counter(e.task for e in usable)
    say(f"examples: {len(usable)} ({counts['caption']} caption, {counts['concepts']} concepts)")
    for problem, n in problems.items():
        if n:
            first = f" (first: {', '.join(list(no_image)[:3])}; listed in {ERRORS_FILE})" if problem == NO_IMAGE else ""
            say(f"  skipped or adjusted: {problem}: {n}{first}")
    errors_path = Path(output_dir) / ERRORS_FILE
    say(f"image check: {len({e.image_path for e in examples})} files in {time.monotonic() - started:.1f} s")
    if unreadable:
        say(f"  skipped: image cannot be read: {len(unreadable)} ({len(examples) - len(usable)} examples), "
            f"listed in {errors_path}")
    if rank == 0:
        write_errors_file(output_dir, {**no_image, **unreadable})
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
    resume = gather_everywhere(resolve_resume(value, output_dir))[0]
    if resume and not all(gather_everywhere(Path(resume).is_dir())):
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


def validation_scores(model, processor, args: argparse.Namespace, mapper: CuiMapper | None,
                      truth: dict[str, dict]) -> dict | None:
    """Scores on the validation images after training; None when there are none to score."""
    if not truth:
        return None
    model.eval()  # no dropout while generating
    return evaluate_adapter(model, processor, args, mapper, truth)


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
    check_options(args)
    if not args.load_in_4bit:
        errors.quiet_unused_bitsandbytes()
    truth = read_validation_truth(args)
    mapper, examples, problems, no_image = read_training_data(args.image_dir, args.train_captions,
                                                              args.train_concepts, args.cui_mapping_file,
                                                              args.language)
    training_args, device_map, dtype = start_processes(args)
    rank, world = training_args.process_index, training_args.world_size
    say = errors.log if rank == 0 else quiet
    usable, unreadable = drop_unreadable(examples, problems, no_image, args.output_dir, rank, world, say)
    model, processor = load_lora_model(args, device_map, dtype, say)
    batch = batch_sizes(args.batch_size, args.gradient_accumulation_steps, world)
    say(f"global batch: {batch['global_batch_size']} = {args.batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {world} process{'es' if world > 1 else ''}")
    resume = shared_checkpoint(args.resume_from_checkpoint, args.output_dir, say)
    resumed_from = checkpoint_step(resume)
    again = resume_command(script, argv, world)
    trained = train(model, processor, usable, training_args, resume, args.language, args.max_length,
                    hint=f"stopped at once, without a checkpoint for this step; to continue from the latest one:\n"
                    f"  {again}")
    if trained.stopped_by and trained.global_step < trained.max_steps:
        say(f"stopped by {signal.Signals(trained.stopped_by).name} at step {trained.global_step} of "
            f"{trained.max_steps}; checkpoint: {Path(args.output_dir) / f'checkpoint-{trained.global_step}'}\n"
            f"to continue:\n  {again}")
        return 128 + trained.stopped_by
    if rank != 0:
        return 0  # rank 0 writes the adapter, the errors file, the summary and the plot

    save_adapter(model, args.output_dir)
    failures = {**unreadable, **trained.seen.failures}
    errors_file = write_errors_file(args.output_dir, {**no_image, **failures})
    validation = validation_scores(model, processor, args, mapper, truth)
    curve = write_loss_curve(args.output_dir, trained, validation, batch["global_batch_size"], resumed_from)
    summary = run_summary(usable, problems, failures, trained, batch, resumed_from, validation, errors_file, curve)
    files.write_text_atomic(Path(args.output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2))
    errors.log(json.dumps(summary, indent=2) + f"\nadapter saved to {args.output_dir}; use it with "
               f"--adapter_repo {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
