"""CUI mapping speed: parse and map 20,000 model answers of ~5 phrases each.

    python benchmarks/mapping.py [--cui_mapping_file ../shared/data/rocov2/cui_mapping.csv]

Answers mix canonical names with the variants the model writes (case, plurals, Spanish,
abbreviations, typos, unknown phrases), drawn from the mapping file itself. Prints one table.
The default mapping is the ROCOv2 release's (1,947 CUIs) when ../shared/data holds it, else the
repository's data/cui_names.csv.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ROCOV2_MAPPING = ROOT.parent / "shared" / "data" / "rocov2" / "cui_mapping.csv"
SHIPPED_MAPPING = ROOT / "data" / "cui_names.csv"

from jjvmed.cui_mapper import CuiMapper  # noqa: E402
from jjvmed.prompts import parse_answer  # noqa: E402

VARIANTS = ["tórax", "TC", "resonancia magnética", "derrame pleural", "riñón izquierdo", "CXR", "pleural effusions",
            "haemorrhage", "Pnuemothorax", "flux capacitor", "image", "left lower quadrant thing"]


def answers(names: list[str], count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        phrases = [rng.choice(names) if rng.random() < 0.7 else rng.choice(VARIANTS) for _ in range(5)]
        phrases = [p.lower() if rng.random() < 0.2 else p for p in phrases]
        out.append("Los conceptos médicos clave son: " + ", ".join(phrases))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cui_mapping_file", default=str(ROCOV2_MAPPING if ROCOV2_MAPPING.is_file() else
                                                          SHIPPED_MAPPING),
                        help="CUI plus a name column (default: the ROCOv2 release's, else data/cui_names.csv)")
    parser.add_argument("--answers", type=int, default=20_000, help="how many answers to parse and map")
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        mapper = CuiMapper.from_csv(args.cui_mapping_file)
    except ValueError as e:  # a missing file or one without CUI and name columns
        sys.exit(f"error: {e}")
    build = time.perf_counter() - start
    texts = answers(list(mapper.names.values()), args.answers)
    start = time.perf_counter()
    mapped = unmapped = 0
    for text in texts:
        cuis, missed = mapper.map_phrases(parse_answer(text, mapper))
        mapped += len(cuis)
        unmapped += len(missed)
    seconds = time.perf_counter() - start
    print(f"\n{args.cui_mapping_file}: {len(mapper.names)} CUIs")
    print("| step | seconds | rate |\n|---|---|---|")
    print(f"| build the indexes | {build:.2f} | - |")
    print(f"| parse + map {len(texts):,} answers | {seconds:.2f} | {len(texts) / seconds:,.0f} answers/s |")
    print(f"CUIs found: {mapped:,}; unmapped phrases: {unmapped:,}")


if __name__ == "__main__":
    main()
