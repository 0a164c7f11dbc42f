"""Size and time of an error-analysis report for a test-set-sized run (20,000 images).

    python benchmarks/report_size.py [--images 20000] [--workers N] [--browser]

Cards cycle the real images in tests/data/real_images (generated ones when absent), so every card
decodes a real file and gets its own thumbnail, as in a real run. Ground truth cycles the real ROCO
captions and CUIs in ../shared/data/roco_v1 (synthetic text when absent); predictions drop some concepts,
add wrong ones and swap captions. With --browser, headless chromium also opens the page and reports how
long the page's script took to index the cards and show the first page of them. Prints one table.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jjvmed import report, scores  # noqa: E402
from jjvmed.cui_mapper import CuiMapper  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [row for row in csv.reader(fh)][1:]


def image_paths(folder: Path) -> list[Path]:
    real = sorted((ROOT / "tests" / "data" / "real_images").glob("*.png"))
    if real:
        return real
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(16):
        path = folder / f"generated_{i}.png"
        Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def ground_truth(count: int) -> tuple[list[str], list[tuple[str, ...]]]:
    if (SHARED / "roco_v1").is_dir():
        captions = [r[1] for r in read_csv(SHARED / "roco_v1" / "validation_captions.csv")]
        concepts = [tuple(r[1].split(";")) for r in read_csv(SHARED / "roco_v1" / "validation_concepts.csv")]
    else:
        rng = random.Random(1)
        words = "axial coronal ct mri scan of the chest abdomen pelvis showing a lesion mass arrow".split()
        captions = [" ".join(rng.choices(words, k=15)) for _ in range(1000)]
        concepts = [tuple(f"C{rng.randrange(10**7):07d}" for _ in range(5)) for _ in range(1000)]
    return [captions[i % len(captions)] for i in range(count)], [concepts[i % len(concepts)] for i in range(count)]


def predictions(gt_captions: list[str], gt_concepts: list[tuple[str, ...]]) -> tuple[list[str], list[tuple]]:
    rng = random.Random(0)
    vocabulary = sorted({c for cuis in gt_concepts for c in cuis})
    captions, concepts = [], []
    for caption, cuis in zip(gt_captions, gt_concepts, strict=True):
        captions.append(caption if rng.random() < 0.2 else rng.choice(gt_captions))
        kept = [c for c in cuis if rng.random() < 0.6]
        concepts.append(tuple(kept + rng.sample(vocabulary, rng.randrange(0, 4))))
    return captions, concepts


def browser_load(page: Path) -> tuple[float, str, str]:
    """(seconds chromium took in all, ms from navigation to the first cards shown, ms of that in the page's script).

    The wall time includes starting chromium and printing the whole DOM (--dump-dom); the page's own
    timings do not.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser:
        return float("nan"), "no chromium", "-"
    with tempfile.TemporaryDirectory() as profile:
        start = time.perf_counter()
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--disable-sync", "--no-first-run",
                              f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=600).stdout
        seconds = time.perf_counter() - start

    def attribute(name: str) -> str:
        marker = f'{name}="'
        return dom[dom.index(marker) + len(marker):].split('"', 1)[0] if marker in dom else "?"

    return seconds, attribute("data-ready-ms"), attribute("data-script-ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--browser", action="store_true", help="also open the page in headless chromium")
    parser.add_argument("--keep", help="write the report here instead of a temporary folder")
    args = parser.parse_args()

    names_file = SHARED / "rocov2" / "cui_mapping.csv"
    cui_names = CuiMapper.from_csv(names_file if names_file.exists() else ROOT / "data" / "cui_names.csv").names
    with tempfile.TemporaryDirectory() as tmp:
        paths = image_paths(Path(tmp))
        gt_captions, gt_concepts = ground_truth(args.images)
        pred_captions, pred_concepts = predictions(gt_captions, gt_concepts)
        start = time.perf_counter()
        rouge = scores.rouge1_scores([scores.preprocess_caption(c) for c in gt_captions],
                                       [scores.preprocess_caption(c) for c in pred_captions])
        cards = [report.Card(image_id=f"ImageCLEFmedical_Caption_2025_test_{i + 1}", image_path=paths[i % len(paths)],
                             gt_caption=gt_captions[i], pred_caption=pred_captions[i], gt_cuis=gt_concepts[i],
                             pred_cuis=pred_concepts[i],
                             scores={"f1": scores.image_f1(gt_concepts[i], pred_concepts[i]), "rouge1": rouge[i]})
                 for i in range(args.images)]
        scoring = time.perf_counter() - start
        summary = {"concepts": {"f1": sum(c.scores["f1"] for c in cards) / len(cards)},
                   "captions": {"rouge1": sum(rouge) / len(rouge)}}
        out = Path(args.keep or tmp) / "report.html"
        start = time.perf_counter()
        report.write_report(out, title="benchmark", summary=summary, cards=cards, cui_names=cui_names,
                            workers=args.workers)
        writing = time.perf_counter() - start
        size = out.stat().st_size
        wall, ready, script = browser_load(out) if args.browser else (float("nan"), "-", "-")

    kind = "real" if "REAL" in paths[0].name else "generated"
    print(f"\n{args.images:,} cards cycling {len(paths)} {kind} images, {args.workers} workers, {os.cpu_count()} CPUs")
    print("| step | value |\n|---|---|")
    print(f"| scoring (image_f1, rouge1) | {scoring:.1f} s |")
    print(f"| write_report (thumbnails, plot, page) | {writing:.1f} s |")
    print(f"| file size | {size / 1e6:.1f} MB ({size / args.images / 1000:.1f} KB a card) |")
    print(f"| chromium: navigation to the first cards shown | {ready} ms |")
    print(f"| of which the page's script (index the cards, show the first page) | {script} ms |")
    print(f"| chromium --dump-dom in all (start, load, print the DOM) | {wall:.1f} s |")


if __name__ == "__main__":
    main()
