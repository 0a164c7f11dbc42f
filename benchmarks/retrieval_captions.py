"""What the caption methods cost: a knn caption run at ImageCLEF scale on the CPU, and the extra cost per image of
rag (a longer prompt) and of best of N (N beams, then the reranker) on the tiny model.

    python benchmarks/retrieval_captions.py --knn             # 20,000 test x 80,000 training images, 1,024 dims
    python benchmarks/retrieval_captions.py --generation      # the tiny LLaVA: generate, rag, best of 2 and 4

--knn: the training vectors and the run's vectors are random (normalised) at the real sizes, stored as the caption
index and the embeddings file a real run reads; the captions are ROCO's validation captions
(../shared/data/roco_v1) drawn with replacement, or made-up sentences without it. The whole command is timed
(`generate_captions.py --method knn --embeddings FILE`: reading the index and the file, the exact search, the
consensus, the CSV, the 2026 check), with 1 and 5 neighbours, runs interleaved.

--generation: the tiny random LLaVA (tests/tiny_llava.py) on drawn images, whole commands timed in this process
with one decoding worker (so the model runs on one thread, the same for every contender), runs interleaved:
greedy generate; rag with 3 neighbours (the embeddings given, so the longer prompt and the search are what
differ); best of 2 and 4 beams without a reranker and with a tiny random CLIP reranker. The tiny model's costs
are not the 8B model's: this shows the engine's overhead and how the parts add up, not GPU throughput.
Prints one table per part: seconds per run and per image, min / median / max.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from jjvmed.embeddings import Embeddings, save_embeddings  # noqa: E402
from jjvmed.errors import run_cli  # noqa: E402
from jjvmed.index import fit_index  # noqa: E402

ROCO = ROOT.parent / "shared" / "data" / "roco_v1" / "validation_captions.csv"
ENCODER = {"family": "hf", "name": "synthetic", "pooling": "default", "weights": "random", "image_size": [224, 224],
           "source": "hf:synthetic"}  # what the random vectors stand in for


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def training_captions(rng: np.random.Generator, n: int) -> list[str]:
    if ROCO.exists():
        from jjvmed.tables import read_id_table

        pool = list(read_id_table(ROCO, "Caption").values())
    else:
        words = "axial coronal computed tomography magnetic resonance image chest abdomen showing mass lesion".split()
        pool = [" ".join(rng.choice(words, size=16)) + "." for _ in range(5000)]
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def captions_main(argv: list[str]) -> tuple[int, str]:
    import generate_captions

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(generate_captions.main, argv)
    return code, err.getvalue()


def table(title: str, times: dict[str, list[float]], images: int) -> str:
    lines = [title, f"{'contender':<34} {'s per run: min / median / max':>32} {'ms per image (median)':>22}"]
    base = None
    for name, values in times.items():
        low, mid, high = min(values), statistics.median(values), max(values)
        extra = "" if base is None else f"  ({(mid - base) / images * 1000:+.1f} ms per image)"
        base = mid if base is None else base
        lines.append(f"{name:<34} {low:10.2f} / {mid:7.2f} / {high:7.2f} {mid / images * 1000:16.1f}{extra}")
    return "\n".join(lines)


def knn(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        encoder = {**ENCODER, "dim": args.dim}
        train_ids = [f"train_{n}" for n in range(args.keys)]
        train = Embeddings(train_ids, [unit_vectors(rng, args.keys, args.dim)], [encoder], {}, {})
        fit_index(train, None, tmp / "index", None, dict(zip(train_ids, training_captions(rng, args.keys),
                                                              strict=True)))
        test_ids = [f"test_{n}" for n in range(args.queries)]
        save_embeddings(tmp / "test.npz", Embeddings(test_ids, [unit_vectors(rng, args.queries, args.dim)],
                                                     [encoder], {}, {}))
        times: dict[str, list[float]] = {"knn, nearest caption": [], "knn, consensus of 5": []}
        for _ in range(args.repeats):
            for name, k in (("knn, nearest caption", "1"), ("knn, consensus of 5", "5")):
                out = tmp / f"knn_{k}.csv"
                out.unlink(missing_ok=True)
                start = time.perf_counter()
                code, err = captions_main(["--method", "knn", "--concept_index", str(tmp / "index"), "--embeddings",
                                           str(tmp / "test.npz"), "--neighbours", k, "--output_csv", str(out),
                                           "--device", args.device])
                times[name].append(time.perf_counter() - start)
                assert code == 0, err
        print(table(f"knn caption runs: {args.queries:,} images x {args.keys:,} training images x {args.dim} "
                    f"dimensions, {args.device}, {args.repeats} interleaved runs", times, args.queries))


def draw_images(folder: Path, n: int) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (224, 224), tuple(int(v) for v in rng.integers(0, 60, 3)))
        r = int(rng.integers(30, 80))
        ImageDraw.Draw(img).ellipse([112 - r, 112 - r, 112 + r, 112 + r], fill=tuple(int(v) for v in
                                                                                    rng.integers(80, 255, 3)))
        img.save(folder / f"img_{i:03d}.png")


def generation(args: argparse.Namespace) -> None:
    from tiny_encoders import save_hf_clip
    from tiny_llava import build_tiny_llava

    import concept_index

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_llava(tmp / "tiny")
        draw_images(tmp / "train", 64)
        draw_images(tmp / "test", args.images)
        captions = dict(zip((f"img_{i:03d}" for i in range(64)), training_captions(np.random.default_rng(2), 64),
                            strict=True))
        (tmp / "train.csv").write_text("ID,Caption\n" + "".join(f'{i},"{c}"\n' for i, c in captions.items()))
        quiet = io.StringIO()
        with contextlib.redirect_stderr(quiet):
            for split in ("train", "test"):
                assert run_cli(concept_index.main, ["embed", "--image_dir", str(tmp / split), "--embeddings",
                                                    str(tmp / f"{split}.npz"), "--base_model_path", str(model),
                                                    "--num_workers", "0"]) == 0
            assert run_cli(concept_index.main, ["fit", "--embeddings", str(tmp / "train.npz"), "--train_captions",
                                                str(tmp / "train.csv"), "--concept_index", str(tmp / "index")]) == 0
            reranker = save_hf_clip(tmp / "clip", seed=0)
        common = ["--image_dir", str(tmp / "test"), "--base_model_path", str(model), "--adapter_repo", "none",
                  "--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(args.batch_size),
                  "--num_workers", "1"]
        rag = ["--method", "rag", "--concept_index", str(tmp / "index"), "--embeddings", str(tmp / "test.npz"),
               "--neighbours", "3"]
        contenders = {"generate (greedy)": [], "rag, 3 neighbours": rag, "best of 2 beams, no reranker":
                      ["--candidates", "2"], "best of 2 beams + reranker": ["--candidates", "2", "--rerank_model",
                                                                            str(reranker)],
                      "best of 4 beams, no reranker": ["--candidates", "4"], "best of 4 beams + reranker":
                      ["--candidates", "4", "--rerank_model", str(reranker)]}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for repeat in range(args.repeats + 1):  # the first round warms up, untimed
            for name, extra in contenders.items():
                out = tmp / "runs" / f"{repeat}_{len(times[name])}_{abs(hash(name))}.csv"
                start = time.perf_counter()
                code, err = captions_main([*common, *extra, "--output_csv", str(out)])
                seconds = time.perf_counter() - start
                assert code == 0, err
                if repeat:
                    times[name].append(seconds)
        print(table(f"tiny LLaVA, {args.images} images of 224 px, batch {args.batch_size}, {args.max_new_tokens} new "
                    f"tokens, one model thread, {args.repeats} interleaved runs (whole commands)", times, args.images))
        prompt_tokens(model, tmp)


def prompt_tokens(model: Path, tmp: Path) -> None:
    """Mean text tokens of the prompts (the 576 image tokens come on top of both)."""
    from transformers import AutoTokenizer

    from jjvmed.embeddings import load_embeddings
    from jjvmed.index import load_index
    from jjvmed.prompts import rag_prompt, rag_template, task_prompt
    from jjvmed.retrieval import nearest_captions

    tok = AutoTokenizer.from_pretrained(model)
    plain = task_prompt("caption", "llama3", "es")
    index, emb = load_index(tmp / "index"), load_embeddings(tmp / "test.npz")
    template = rag_template("llama3", "es")
    near = nearest_captions(index, emb, emb.ids, 3)
    rag = [len(tok(rag_prompt(template, near[i]))["input_ids"]) for i in emb.ids]
    print(f"prompt text tokens (tiny tokenizer; + 576 image tokens each): generate {len(tok(plain)['input_ids'])}, "
          f"rag with 3 ROCO captions {np.mean(rag):.0f} on average (min {min(rag)}, max {max(rag)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--knn", action="store_true", help="the knn caption run at ImageCLEF scale")
    p.add_argument("--generation", action="store_true", help="rag and best of N on the tiny model")
    p.add_argument("--keys", type=int, default=80_000, help="training images (default: %(default)s)")
    p.add_argument("--queries", type=int, default=20_000, help="test images (default: %(default)s)")
    p.add_argument("--dim", type=int, default=1024, help="dimensions (default: %(default)s)")
    p.add_argument("--images", type=int, default=48, help="images per tiny-model run (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="tiny-model batch (default: %(default)s)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="tiny-model answer length (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each contender (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the knn search runs (default: %(default)s)")
    args = p.parse_args()
    if not (args.knn or args.generation):
        p.error("choose --knn and/or --generation")
    if args.knn:
        knn(args)
    if args.generation:
        generation(args)


if __name__ == "__main__":
    main()
