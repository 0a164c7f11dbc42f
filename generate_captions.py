"""Caption generation: a folder of medical images -> `ID,Caption` CSV for ImageCLEFmedical Caption.

    python generate_captions.py --image_dir /data/test/images --output_csv results/captions.csv
    # killed half-way? the same command plus:  --resume_from_checkpoint auto
"""

from __future__ import annotations

import sys

import common
from jjvmed.errors import run_cli
from jjvmed.sources import GenerateSource
from jjvmed.writers import CaptionWriter


def build_parser() -> common.Parser:
    parser = common.Parser(
        description="Generate captions for every image in a folder with LLaVA-LLaMA-3-8B + the JJ-VMed LoRA "
        "adapter, and write an ImageCLEFmedical Caption submission (ID,Caption).",
    )
    common.add_common_arguments(parser, task="caption")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    generation = common.generation_from_args(args, task="caption")
    cfg = common.config_from_args(args, task="caption")
    return common.run(cfg, GenerateSource(generation), CaptionWriter(cfg.output_csv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
