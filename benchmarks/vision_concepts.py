"""Vision-tower concepts at ImageCLEF scale, on random vectors: exact kNN, file loading, probe, tuning.

    python benchmarks/vision_concepts.py                         # kNN 20,000 x 80,000 x 1,024 + file load
    python benchmarks/vision_concepts.py --probe --tune           # also a default probe fit and whole tune runs
    python benchmarks/vision_concepts.py --probe_f1               # only: the probe's held-out F1 on learnable data
    python benchmarks/vision_concepts.py --device cuda            # the same on a GPU

The vectors are random (normalised), the labels random with a Zipf-like CUI frequency and ~5
CUIs per image: the F1 means nothing, the times are what a real run costs. Prints one table.
--probe_f1 instead makes data a probe can learn (images of 3,000 topics, each topic with its own
CUIs, vectors = topic centre + noise) and prints a default fit's time and held-out F1.
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

from jjvmed.embeddings import Embeddings, load_embeddings, save_embeddings  # noqa: E402
from jjvmed.index import fit_index, nearest  # noqa: E402
from jjvmed.probe import ProbeOptions, train_probe  # noqa: E402
from jjvmed.tuning import K_GRID, tune  # noqa: E402

# What the random vectors stand in for: LLaVA's tower, described as encoders.vision_encoder_from describes it.
ENCODER = {"family": "llava", "name": "clip_vision_model", "source": "llava", "pooling": "mean", "feature_layer": -2,
           "weights": "random", "image_size": [336, 336]}


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def random_concepts(rng: np.random.Generator, ids: list[str], n_cuis: int, per_image: int = 5) -> dict:
    weights = 1.0 / np.arange(1, n_cuis + 1)
    weights /= weights.sum()
    cuis = [f"C{n:07d}" for n in range(n_cuis)]
    return {i: sorted({cuis[c] for c in rng.choice(n_cuis, size=per_image, p=weights)}) for i in ids}


def topic_data(rng: np.random.Generator, n: int, dim: int, n_cuis: int, centres: np.ndarray, topic_cuis: list,
               noise: float = 1.2):
    """n images of random topics: normalised (centre + noise) vectors; the topic's CUIs, each kept with
    probability 0.85, plus a random Zipf-like CUI for 30% of the images."""
    from scipy.sparse import csr_matrix

    topics = rng.integers(0, len(centres), n)
    vectors = centres[topics] + noise * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_cuis + 1)
    weights /= weights.sum()
    labels = [np.unique(np.concatenate([topic_cuis[t][rng.random(len(topic_cuis[t])) > 0.15],
                                        rng.choice(n_cuis, size=int(rng.random() < 0.3), p=weights)]))
              for t in topics]
    ptr = np.concatenate([[0], np.cumsum([len(x) for x in labels])])
    flat = np.concatenate(labels).astype(np.int64)
    return vectors.astype(np.float32), csr_matrix((np.ones(len(flat), np.float32), flat, ptr), shape=(n, n_cuis))


def probe_f1(args: argparse.Namespace) -> None:
    """A default probe fit on learnable data: time, and the best mean F1 (one global threshold) on held-out images."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3000, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    weights = 1.0 / np.arange(1, args.cuis + 1)
    weights /= weights.sum()
    topic_cuis = [np.unique(np.concatenate([[rng.integers(0, 8)], rng.choice(args.cuis, size=rng.integers(2, 7),
                                                                              p=weights)]))
                  for _ in range(len(centres))]
    x, y = topic_data(rng, args.keys, args.dim, args.cuis, centres, topic_cuis)
    x_held, y_held = topic_data(rng, 5000, args.dim, args.cuis, centres, topic_cuis)
    start = time.perf_counter()
    probe = train_probe(x, y, ProbeOptions(device=args.device))
    seconds = time.perf_counter() - start
    scores, truth = probe.predict(x_held, args.device), y_held.toarray() > 0
    sizes = truth.sum(1)
    best = max((np.where((scores >= t).sum(1) == 0, 0.0, 2 * ((scores >= t) & truth).sum(1)
                         / (sizes + np.maximum((scores >= t).sum(1), 1))).mean(), t) for t in np.arange(0.05, 1, 0.05))
    print(f"probe on {args.keys:,} x {args.dim:,} topic vectors, {args.cuis:,} CUIs: {seconds:.0f} s, "
          f"{probe.info['passes']} passes, {probe.info['steps']} steps of {probe.info['batch_size']}, training loss "
          f"{probe.info['final_loss']:.5f}; held-out F1 {best[0]:.4f} (threshold {best[1]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=20_000, help="test images")
    parser.add_argument("--keys", type=int, default=80_000, help="training images")
    parser.add_argument("--valid", type=int, default=17_000, help="validation images for --tune")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--cuis", type=int, default=2479)
    parser.add_argument("--k", type=int, default=max(K_GRID))
    parser.add_argument("--chunk", type=int, default=1024, help="queries per matrix product")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", action="store_true", help="time a default probe fit (concept_index.py fit)")
    parser.add_argument("--tune", action="store_true", help="time whole tune runs (kNN grid, probe, thresholds), "
                        "without and with per-CUI thresholds, interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="tune runs of each kind, for --tune")
    parser.add_argument("--probe_f1", action="store_true", help="only a default probe fit on learnable data")
    args = parser.parse_args()
    if args.probe_f1:
        return probe_f1(args)

    import torch

    rng = np.random.default_rng(0)
    rows = []
    keys = unit_vectors(rng, args.keys, args.dim)
    queries = unit_vectors(rng, args.queries, args.dim)
    start = time.perf_counter()
    nearest(keys, queries, args.k, args.device, args.chunk)
    seconds = time.perf_counter() - start
    rows.append((f"exact kNN {args.queries:,} x {args.keys:,} x {args.dim:,}, k={args.k}", seconds,
                 f"{args.queries / seconds:,.0f} queries/s"))

    ids = [f"ImageCLEFmedical_Caption_2025_train_{n}" for n in range(args.keys)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.npz"
        start = time.perf_counter()
        save_embeddings(path, Embeddings(ids, [keys], [{**ENCODER, "dim": args.dim}]))
        rows.append((f"save {args.keys:,} x {args.dim:,} embeddings ({path.stat().st_size / 1e6:,.0f} MB)",
                     time.perf_counter() - start, ""))
        start = time.perf_counter()
        train = load_embeddings(path)
        rows.append(("load them", time.perf_counter() - start, ""))

        concepts = random_concepts(rng, ids, args.cuis)
        if args.probe:
            index = fit_index(train, concepts, Path(tmp) / "index", None)
            start = time.perf_counter()
            probe = train_probe(index.members[0].vectors, index.label_matrix(), ProbeOptions(device=args.device))
            seconds = time.perf_counter() - start
            steps, batch = probe.info["steps"], probe.info["batch_size"]
            rows.append((f"probe fit, defaults ({args.dim:,} -> {len(index.cuis):,} CUIs): {probe.info['passes']} "
                         f"passes, {steps} steps of {batch}", seconds, f"{seconds / steps * 1000:.0f} ms/step"))
        if args.tune:
            index = fit_index(train, concepts, Path(tmp) / "index", ProbeOptions(epochs=1, device=args.device))
            valid_ids = [f"ImageCLEFmedical_Caption_2025_valid_{n}" for n in range(args.valid)]
            # the validation vectors carry the training file's encoder description, as embed would write it
            valid = Embeddings(valid_ids, [unit_vectors(rng, args.valid, args.dim)], train.encoders)
            gt = {i: tuple(c) for i, c in random_concepts(rng, valid_ids, args.cuis).items()}
            generated = random_concepts(rng, valid_ids, args.cuis, per_image=4)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for per_cui in (False, True):
                    start = time.perf_counter()
                    tune(index, valid, gt, generated, device=args.device, per_cui=per_cui)
                    times[per_cui].append(time.perf_counter() - start)
            for per_cui, runs in times.items():
                rows.append((f"tune on {args.valid:,} validation images (+ generated CUIs), per-CUI thresholds "
                             f"{'on' if per_cui else 'off'}", runs, ""))
    print(f"\ndevice: {args.device}, torch threads: {torch.get_num_threads()}, training images: {args.keys:,}, "
          f"dimensions: {args.dim:,}")
    print("| step | seconds (of several runs: min / median / max) | rate |\n|---|---|---|")
    for name, seconds, rate in rows:
        if isinstance(seconds, list):
            runs = sorted(seconds)
            seconds_text = " / ".join(f"{x:.2f}" for x in (runs[0], runs[len(runs) // 2], runs[-1]))
        else:
            seconds_text = f"{seconds:.2f}"
        print(f"| {name} | {seconds_text} | {rate} |")


if __name__ == "__main__":
    main()
