"""LoRA fine-tuning of LLaVA-LLaMA-3-8B on ROCOv2-style data: the adapter the generate scripts load.

    python finetune.py --image_dir /data/train/images --captions_csv train_captions.csv \\
        --concepts_csv train_concepts.csv --cui_mapping_file cui_mapping.csv \\
        --valid_image_dir /data/valid/images --valid_captions_csv valid_captions.csv \\
        --valid_concepts_csv valid_concepts.csv --output_dir adapters/run1 --load_in_4bit
    python generate_captions.py --adapter_repo adapters/run1 ...

Defaults reproduce the published adapter's recipe: LoRA r=16, alpha 32, dropout 0.05 on every
attention and MLP projection of the language model and on the projector; the `vicuna` prompt with
the Spanish instructions; caption and concept examples; 1 epoch, lr 5e-5, cosine, 3% warm-up,
effective batch 32; loss on the answer tokens only. Prompts come from common.py, the same ones
generation uses, so training and inference cannot drift apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import common
import errors
from generation import generate_batches
from images import id_sort_key, list_images, load_image, make_loader
from model import (
    DEFAULT_BASE_MODEL,
    load_base_model,
    load_processor,
    resolve_device_and_dtype,
)

# The language model's attention and MLP projections, and the projector (transformers-5 names).
LORA_TARGETS = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
                r"|model\.multi_modal_projector\.linear_[12]")
NO_CONCEPTS_ANSWER = "ningún concepto médico específico fue identificado"
IGNORE = -100


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
    prefix = common.ANSWER_PREFIXES[("concepts", language)]
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
            answer = f"{prefix} {', '.join(known)}" if known else NO_CONCEPTS_ANSWER
            examples.append(Example(image_id, path, "concepts", answer))
    problems["image file with no CSV row"] = len(set(images) - set(captions) - set(concepts))
    return examples, problems


class TrainDataset:
    """Decodes and tokenizes one example on demand: prompt and image tokens masked, answer kept."""

    def __init__(self, examples: list[Example], processor, template: str, language: str, max_length: int):
        self.examples = examples
        self.processor = processor
        self.prompts = {task: common.build_prompt(template, common.INSTRUCTIONS[(task, language)])
                        for task in ("caption", "concepts")}
        self.max_length = max_length
        self.eos = processor.tokenizer.eos_token

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        import torch

        ex = self.examples[index]
        image = load_image(ex.image_path)
        prompt = self.processor(text=self.prompts[ex.task], images=image, return_tensors="pt")
        answer = self.processor.tokenizer(" " + ex.answer + self.eos, add_special_tokens=False,
                                          return_tensors="pt")["input_ids"][0]
        prompt_ids = prompt["input_ids"][0]
        input_ids = torch.cat([prompt_ids, answer])[: self.max_length]
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE), answer])[: self.max_length]
        return {"input_ids": input_ids, "labels": labels, "pixel_values": prompt["pixel_values"][0]}


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
        }


def lora_model(model, r: int, alpha: int, dropout: float, load_in_4bit: bool, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if load_in_4bit:
        # QLoRA: fp32 norms and inputs that need grads, so gradients flow through the frozen 4-bit base.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA fine-tuning of LLaVA-LLaMA-3-8B for ImageCLEFmedical Caption "
                                "(the recipe of the published JJ-VMed adapter by default).")
    data = p.add_argument_group("data")
    data.add_argument("--image_dir", required=True, help="training images; ID = file name without extension")
    data.add_argument("--captions_csv", help="ID,Caption (caption examples)")
    data.add_argument("--concepts_csv", help="ID,CUIs (concept examples; needs --cui_mapping_file)")
    data.add_argument("--cui_mapping_file", help="CUI,Canonical name file that turns CUIs into the answer's names")
    data.add_argument("--valid_image_dir", help="validation images for the end-of-training evaluation")
    data.add_argument("--valid_captions_csv")
    data.add_argument("--valid_concepts_csv")
    data.add_argument("--eval_images", type=int, default=50,
                      help="validation images generated and scored after training; 0 skips it (default: %(default)s)")
    data.add_argument("--language", choices=["es", "en"], default="es", help="instruction language (default: es)")
    data.add_argument("--max_length", type=int, default=1024, help="tokens per example (default: %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("--base_model_path", default=DEFAULT_BASE_MODEL)
    model.add_argument("--load_in_4bit", action="store_true", help="QLoRA: train LoRA on a 4-bit NF4 base")
    model.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    model.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=int, default=16)
    lora.add_argument("--lora_alpha", type=int, default=32)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    train = p.add_argument_group("training")
    train.add_argument("--output_dir", required=True, help="adapter and Trainer checkpoints go here")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max_steps", type=int, default=-1, help="stop after N optimizer steps (overrides --epochs)")
    train.add_argument("--learning_rate", type=float, default=5e-5)
    train.add_argument("--lr_scheduler", default="cosine")
    train.add_argument("--warmup_ratio", type=float, default=0.03)
    train.add_argument("--batch_size", type=int, default=4, help="per device (default: %(default)s)")
    train.add_argument("--gradient_accumulation_steps", type=int, default=8,
                       help="effective batch = batch_size x this x GPUs (default: 4 x 8 = 32)")
    train.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    train.add_argument("--logging_steps", type=int, default=10)
    train.add_argument("--save_steps", type=int, default=200)
    train.add_argument("--num_workers", type=int, default=2)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|auto",
                       help="continue from a Trainer checkpoint in --output_dir ('auto' = the latest)")
    return p


def evaluate_adapter(model, processor, args, mapper) -> dict:
    """Generate for the first --eval_images validation images and score them with evaluate.py.

    Uses the generation core and the prompts, token limits and post-processing of the generate
    scripts, so the scores say what those scripts would give.
    """
    import evaluate
    from cui_mapper import parse_answer

    names = mapper.names if mapper else {}
    examples, _ = build_examples(args.valid_image_dir, args.valid_captions_csv, args.valid_concepts_csv, names,
                                 args.language)
    results: dict = {}
    for task in ("caption", "concepts"):
        chosen = [e for e in examples if e.task == task][: args.eval_images]
        if not chosen:
            continue
        prompt = common.build_prompt("vicuna", common.INSTRUCTIONS[(task, args.language)],
                                     common.ANSWER_PREFIXES.get((task, args.language), ""))
        loader = make_loader([(e.image_id, e.image_path) for e in chosen], processor, prompt, args.batch_size, 0)
        gen_kwargs = {"max_new_tokens": common.MAX_NEW_TOKENS[task], "do_sample": False, "num_beams": 1}
        texts = {r.id: r.text for records in generate_batches(model, processor, loader, gen_kwargs) for r in records}
        if task == "caption":
            gt = {e.image_id: e.answer for e in chosen}
            pred = {i: common.clean_caption(t) for i, t in texts.items()}
            summary, _ = evaluate.caption_scores(gt, pred)
            results["caption_rouge1"] = summary["rouge1"]
        else:
            truth = read_id_table(args.valid_concepts_csv, "CUIs")
            gt = {e.image_id: tuple(c.strip() for c in truth[e.image_id].split(";")) for e in chosen}
            pred = {i: tuple(mapper.map_phrases(parse_answer(t, mapper))[0]) for i, t in texts.items()}
            summary, _ = evaluate.concept_scores(gt, pred)
            results["concepts_f1"] = summary["f1"]
        results[f"{task}_images"] = len(chosen)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.captions_csv and not args.concepts_csv:
        raise errors.UserError("give --captions_csv and/or --concepts_csv")
    if args.concepts_csv and not args.cui_mapping_file:
        raise errors.UserError("--concepts_csv needs --cui_mapping_file to turn CUIs into names")
    # Read once: its names make the training answers and its index maps the validation answers.
    mapper = common.load_mapper(args.cui_mapping_file) if args.cui_mapping_file else None
    names = mapper.names if mapper else {}
    examples, problems = build_examples(args.image_dir, args.captions_csv, args.concepts_csv, names, args.language)
    counts = Counter(e.task for e in examples)
    errors.log(f"examples: {len(examples)} ({counts['caption']} caption, {counts['concepts']} concepts)")
    for problem, n in problems.items():
        if n:
            errors.log(f"  skipped or adjusted: {problem}: {n}")
    if not examples:
        raise errors.UserError("no usable training examples; check the IDs in the CSVs against the image names")

    import torch
    from transformers import Trainer, TrainingArguments

    device_map, dtype = resolve_device_and_dtype(args.device, args.dtype)
    processor = load_processor(args.base_model_path)
    base = load_base_model(args.base_model_path, device_map, dtype, args.load_in_4bit)
    model = lora_model(base, args.lora_r, args.lora_alpha, args.lora_dropout, args.load_in_4bit,
                       args.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    errors.log(f"trainable LoRA parameters: {trainable:,}")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    training_args = TrainingArguments(
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
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        dataloader_num_workers=args.num_workers,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=not cuda,
    )
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=TrainDataset(examples, processor, "vicuna", args.language, args.max_length),
                      data_collator=Collator(processor.tokenizer.pad_token_id))
    resume = args.resume_from_checkpoint
    if resume == "auto":
        resume = any(Path(args.output_dir).glob("checkpoint-*")) or None
    result = trainer.train(resume_from_checkpoint=resume)
    model.save_pretrained(args.output_dir)  # adapter_config.json + adapter_model.safetensors
    summary = {"examples": dict(counts), "skipped": {k: v for k, v in problems.items() if v},
               "train_loss": result.training_loss, "steps": result.global_step}
    if args.valid_image_dir and args.eval_images > 0:
        model.eval()
        summary["validation"] = evaluate_adapter(model, processor, args, mapper)
    (Path(args.output_dir) / "finetune_summary.json").write_text(json.dumps(summary, indent=2))
    errors.log(json.dumps(summary, indent=2) + f"\nadapter saved to {args.output_dir}; use it with "
               f"--adapter_repo {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
