"""Image encoders and ensembles: CPU throughput of the tiny test encoders, and what each piece of the concept
method gives on the real ROCO label sets with stand-in features.

    python benchmarks/encoders.py --speed          # images/s of each tiny encoder family (embed_items, CPU)
    python benchmarks/encoders.py --roco           # F1 table: single encoders, ensemble, decision rules

--speed: 64 synthetic 512 x 512 JPEGs (ROCO images are about that size), batch 32, no worker processes,
the same torch threads for every encoder, each encoder run --repeats times interleaved; min/median/max.
--roco: the 8,180 label sets of ../shared/data/roco_v1 (real CUIs and their real co-occurrence), two
stand-in "encoders" that each see the CUIs of one half of the CUI list (a vector = the sum of random
directions of the CUIs it sees + noise): training 8,180 images, tuning and test 4,090 each (the same
label sets drawn again with new noise, split in halves). Prints the test F1 of each method as tune
chooses it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def speed(args: argparse.Namespace) -> None:
    import tiny_encoders as tiny
    import torch
    from PIL import Image

    from jjvmed.embeddings import embed_items
    from jjvmed.encoders import load_encoder

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        items = []
        for n in range(args.images):
            path = tmp / f"img_{n}.jpg"
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(path, quality=90)
            items.append((f"img_{n}", str(path)))
        encoders = {name: load_encoder(build(tmp / name), "default", "cpu", "float32")
                    for name, build in tiny.ENCODERS.items()}
        times: dict[str, list[float]] = {name: [] for name in encoders}
        for _ in range(args.repeats):
            for name, encoder in encoders.items():
                start = time.perf_counter()
                embed_items(encoder, items, 32, 0)
                times[name].append(args.images / (time.perf_counter() - start))
        print(f"\n{args.images} JPEGs of 512 x 512, batch 32, no workers, torch threads {args.threads}, "
              f"{args.repeats} interleaved runs")
        print("| encoder | input | images/s min | median | max |\n|---|---|---|---|---|")
        for name, rates in times.items():
            size = encoders[name].info["image_size"]
            print(f"| {name} | {size[0]} x {size[1]} | {min(rates):.0f} | {statistics.median(rates):.0f} | "
                  f"{max(rates):.0f} |")
        # how much of that is decoding and preprocessing alone (what worker processes take off the GPU's path)
        from jjvmed.preprocessing import Preprocessing

        pre = Preprocessing((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "shortest", 0.875)
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for _, path in items:
                with Image.open(path) as img:
                    pre([img])
            rates.append(args.images / (time.perf_counter() - start))
        print(f"| decode + preprocess only (224 px, one core) | - | {min(rates):.0f} | {statistics.median(rates):.0f} "
              f"| {max(rates):.0f} |")


def roco(args: argparse.Namespace) -> None:
    from jjvmed.embeddings import Embeddings
    from jjvmed.fusion import predict_concepts
    from jjvmed.index import ProbeOptions, fit_index
    from jjvmed.scores import concept_scores
    from jjvmed.tables import read_concept_csv
    from jjvmed.tuning import tune

    path = ROOT.parent / "shared" / "data" / "roco_v1" / "validation_concepts.csv"
    if not path.exists():
        sys.exit(f"needs {path}")
    labels = {i: [c for c in cuis if c] for i, cuis in read_concept_csv(path).items()}
    labels = {i: c for i, c in labels.items() if c}
    ids = sorted(labels)
    cuis = sorted({c for i in ids for c in labels[i]})
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((len(cuis), args.dim)).astype(np.float32)
    column = {c: n for n, c in enumerate(cuis)}
    halves = [set(cuis[0::2]), set(cuis[1::2])]  # what each stand-in encoder sees

    def vectors(names: list[str], sees: set, noise: float, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        out = np.stack([directions[[column[c] for c in labels[i] if c in sees]].sum(0) if
                        any(c in sees for c in labels[i]) else np.zeros(args.dim, np.float32) for i in names])
        out = out + noise * r.standard_normal(out.shape).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    made = [{"family": "timm", "name": f"half-{h}", "source": f"timm:/stand-in/{h}", "pooling": "default",
             "weights": str(h)} for h in (0, 1)]
    rows = []
    for noise in args.noise:
        train = Embeddings(ids, [vectors(ids, halves[h], noise, 10 + h) for h in (0, 1)], made)
        again = [vectors(ids, halves[h], noise, 20 + h) for h in (0, 1)]
        tune_ids, test_ids = ids[0::2], ids[1::2]
        pick = {i: n for n, i in enumerate(ids)}

        def split(names, again=again, pick=pick):
            return Embeddings(names, [v[[pick[i] for i in names]] for v in again], made)

        gt = {i: tuple(labels[i]) for i in ids}
        for members, name in (([0], "encoder A alone"), ([1], "encoder B alone"), ([0, 1], "ensemble A + B")):
            with tempfile.TemporaryDirectory() as tmp:
                part = Embeddings(ids, [train.vectors[m] for m in members], [made[m] for m in members])
                start = time.perf_counter()
                index = fit_index(part, labels, tmp, ProbeOptions(device="cpu"))
                fit_s = time.perf_counter() - start
                valid = split(tune_ids)
                valid = Embeddings(valid.ids, [valid.vectors[m] for m in members], [made[m] for m in members])
                test = split(test_ids)
                test = Embeddings(test.ids, [test.vectors[m] for m in members], [made[m] for m in members])
                settings, table = tune(index, valid, {i: gt[i] for i in tune_ids})
                for method, chosen in settings["methods"].items():
                    pred = predict_concepts(index, chosen, test)
                    f1 = concept_scores({i: gt[i] for i in test_ids},
                                        {i: tuple(c) or ("",) for i, c in pred.items()})[0]["f1"]
                    rows.append((noise, name, method, chosen["f1"], chosen["f1_heldout"], f1, chosen["note"] or
                                 "one threshold", fit_s))
                if name == "ensemble A + B":
                    for row in table:
                        if "f1_heldout" in row and "(chosen)" not in row["method"]:
                            rows.append((noise, name, row["method"], row["f1"], row["f1_heldout"], float("nan"),
                                         "", fit_s))
    print(f"\nROCO label sets ({len(ids)} images, {len(cuis)} CUIs), stand-in features of {args.dim} dimensions")
    print("| noise | encoders | method | F1 tuning | F1 held-out halves | F1 test | decision | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for noise, name, method, f1, held, test, note, fit_s in rows:
        test_text = "" if test != test else f"{test:.4f}"
        print(f"| {noise} | {name} | {method} | {f1:.4f} | {held:.4f} | {test_text} | {note} | {fit_s:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--roco", action="store_true")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.1])
    args = parser.parse_args()
    if args.speed:
        speed(args)
    if args.roco:
        roco(args)


if __name__ == "__main__":
    main()
