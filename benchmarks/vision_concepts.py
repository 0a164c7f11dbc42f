"""Vision-tower concepts at ImageCLEF scale, on random vectors: exact kNN, file loading, probe, tuning.

    python benchmarks/vision_concepts.py                         # kNN 20,000 x 80,000 x 1,024 + file load
    python benchmarks/vision_concepts.py --probe_steps 20 --tune  # also probe steps and a whole tune run
    python benchmarks/vision_concepts.py --device cuda            # the same on a GPU

The vectors are random (normalised), the labels random with a Zipf-like CUI frequency and ~5
CUIs per image: the F1 means nothing, the times are what a real run costs. Prints one table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vision_concepts as vc  # noqa: E402


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def random_concepts(rng: np.random.Generator, ids: list[str], n_cuis: int, per_image: int = 5) -> dict:
    weights = 1.0 / np.arange(1, n_cuis + 1)
    weights /= weights.sum()
    cuis = [f"C{n:07d}" for n in range(n_cuis)]
    return {i: sorted({cuis[c] for c in rng.choice(n_cuis, size=per_image, p=weights)}) for i in ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20_000, help="test images")
    parser.add_argument("--keys", type=int, default=80_000, help="training images")
    parser.add_argument("--valid", type=int, default=17_000, help="validation images for --tune")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--cuis", type=int, default=2479)
    parser.add_argument("--k", type=int, default=max(vc.K_GRID))
    parser.add_argument("--chunk", type=int, default=1024, help="queries per matrix product")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe_steps", type=int, default=0, help="time this many probe steps (batch 512)")
    parser.add_argument("--tune", action="store_true", help="time a whole tune run (kNN grid, probe, thresholds)")
    args = parser.parse_args()

    import torch

    rng = np.random.default_rng(0)
    rows = []
    keys = unit_vectors(rng, args.keys, args.dim)
    queries = unit_vectors(rng, args.queries, args.dim)
    start = time.perf_counter()
    vc.nearest(keys, queries, args.k, args.device, args.chunk)
    seconds = time.perf_counter() - start
    rows.append((f"exact kNN {args.queries:,} x {args.keys:,} x {args.dim:,}, k={args.k}", seconds,
                 f"{args.queries / seconds:,.0f} queries/s"))

    ids = [f"ImageCLEFmedical_Caption_2025_train_{n}" for n in range(args.keys)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.npz"
        start = time.perf_counter()
        vc.save_embeddings(path, vc.Embeddings(ids, keys))
        rows.append((f"save {args.keys:,} x {args.dim:,} embeddings ({path.stat().st_size / 1e6:,.0f} MB)",
                     time.perf_counter() - start, ""))
        start = time.perf_counter()
        train = vc.load_embeddings(path)
        rows.append(("load them", time.perf_counter() - start, ""))

        concepts = random_concepts(rng, ids, args.cuis)
        if args.probe_steps:
            index = vc.fit_index(train, concepts, Path(tmp) / "index", None)
            options = vc.ProbeOptions(steps=args.probe_steps, device=args.device)
            start = time.perf_counter()
            vc.train_probe(index.vectors, index.label_matrix(), options)
            seconds = time.perf_counter() - start
            rows.append((f"probe: {args.probe_steps} steps of 512 ({args.dim:,} -> {len(index.cuis):,} CUIs)", seconds,
                         f"{seconds / args.probe_steps * 1000:.0f} ms/step"))
        if args.tune:
            index = vc.fit_index(train, concepts, Path(tmp) / "index", vc.ProbeOptions(steps=10, device=args.device))
            valid_ids = [f"ImageCLEFmedical_Caption_2025_valid_{n}" for n in range(args.valid)]
            valid = vc.Embeddings(valid_ids, unit_vectors(rng, args.valid, args.dim))
            gt = {i: tuple(c) for i, c in random_concepts(rng, valid_ids, args.cuis).items()}
            generated = random_concepts(rng, valid_ids, args.cuis, per_image=4)
            start = time.perf_counter()
            vc.tune(index, valid, gt, generated, device=args.device)
            rows.append((f"tune on {args.valid:,} validation images (+ generated CUIs)", time.perf_counter() - start,
                         ""))
    print(f"\ndevice: {args.device}, torch threads: {torch.get_num_threads()}")
    print("| step | seconds | rate |\n|---|---|---|")
    for name, seconds, rate in rows:
        print(f"| {name} | {seconds:.2f} | {rate} |")


if __name__ == "__main__":
    main()
