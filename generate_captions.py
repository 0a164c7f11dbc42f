"""Caption generation: a folder of medical images -> `ID,Caption` CSV for ImageCLEFmedical Caption.

    python generate_captions.py --image_dir /data/test/images --output_csv results/captions.csv
    # killed half-way? the same command plus:  --resume_from_checkpoint auto
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
from jjvmed import prompts
from jjvmed.errors import run_cli
from jjvmed.files import write_csv_atomic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate captions for every image in a folder with LLaVA-LLaMA-3-8B + the JJ-VMed LoRA "
        "adapter, and write an ImageCLEFmedical Caption submission (ID,Caption).",
    )
    common.add_common_arguments(parser, task="caption")
    return parser


def write_captions(output_csv: str, ids: list[str], records: dict) -> list[Path]:
    rows = common.answer_rows(ids, records, prompts.clean_caption)
    return [write_csv_atomic(output_csv, ["ID", "Caption"], rows)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = common.config_from_args(args, task="caption")
    return common.run(cfg, lambda ids, records: write_captions(args.output_csv, ids, records))


if __name__ == "__main__":
    sys.exit(run_cli(main))
