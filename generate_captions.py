"""Caption generation: a folder of medical images -> `ID,Caption` CSV for ImageCLEFmedical Caption.

    python generate_captions.py --image_dir /data/test/images --output_csv results/captions.csv
    # killed half-way? the same command plus:  --resume_from_checkpoint auto
"""

from __future__ import annotations

import argparse
import re
import sys

import common
import errors
import files

# Openings the model may echo before the caption: template words and trained answer prefixes.
CAPTION_PREFIXES = re.compile(
    r"^\s*(?:(?:ASSISTANT|USER|assistant|Caption|Pie de foto|Descripción|Description|Answer|Respuesta)\s*:\s*)+",
    re.IGNORECASE,
)
QUOTES = "\"'“”‘’«»"


def clean_caption(text: str) -> str:
    """Strip echoed prompt parts and answer prefixes, quotes, and collapse all whitespace to single spaces."""
    text = text.split("USER:")[0]  # the model sometimes starts a new turn
    text = re.split(r"\n\s*(?:Conceptos médicos clave|Key medical concepts)\s*:", text)[0]
    text = " ".join(text.split())
    text = CAPTION_PREFIXES.sub("", text).strip()
    if len(text) >= 2 and text[0] in QUOTES and text[-1] in QUOTES:
        text = text[1:-1].strip()
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate captions for every image in a folder with LLaVA-LLaMA-3-8B + the JJ-VMed LoRA "
        "adapter, and write an ImageCLEFmedical Caption submission (ID,Caption).",
    )
    common.add_common_arguments(parser, task="caption", max_new_tokens=100)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = common.build_config(args, task="caption")
    result = common.merge_shards(cfg) if args.merge_shards else common.run_generation(cfg)
    outputs = []
    accepted = True
    if result.writer and not result.interrupted:
        rows = common.iter_rows(result.ids, result.records, clean_caption)
        outputs.append(files.write_csv_atomic(args.output_csv, ["ID", "Caption"], rows))
        accepted = common.check_submission("captions", args.output_csv, result.ids)
    return common.finish_run(result, args.output_csv, outputs, rejected=not accepted)


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
