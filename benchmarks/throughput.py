"""Throughput benchmark: the naive one-image loop vs the engine at several batch sizes.

    python benchmarks/throughput.py                      # CPU, tiny test model (built offline)
    python benchmarks/throughput.py --full_size          # GPU, LLaVA-LLaMA-3-8B-shaped, random bf16 weights
    python benchmarks/throughput.py --memory --resume    # also: memory at 200 vs 2000 images, resume cost

Every configuration runs on the same images with greedy decoding forced to a fixed length
(min_new_tokens == max_new_tokens), and its answers are compared with the baseline's, so a
speed-up can never come from doing less work. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from generation import generate_texts  # noqa: E402
from images import Collate, list_images, load_image  # noqa: E402
from model import ModelSpec, input_device, load_model, load_processor, quantization_config  # noqa: E402
from tiny_llava import build_tiny_llava, llava_llama3_8b_config  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "real_images"


class PeakMemory:
    """Samples the memory of this process and its children (DataLoader workers).

    Uses PSS (proportional set size): forked workers share the parent's pages copy-on-write, and
    summing plain RSS would count the model once per worker.
    """

    def __init__(self, every: float = 0.01):
        self.every = every
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def children(pid: int) -> list[int]:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                return [int(p) for p in fh.read().split()]
        except OSError:
            return []

    def sample(self) -> int:
        me = os.getpid()
        return self.rss(me) + sum(self.rss(c) for c in self.children(me))

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def gpu_peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def image_folder(source: Path, count: int, out: Path) -> Path:
    """`count` images, cycling through the source images (symlinks, so decoding cost is real)."""
    sources = [Path(p) for _, p in list_images(source)]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = sources[i % len(sources)]
        (out / f"img_{i:05d}{src.suffix}").symlink_to(src.resolve())
    return out


def naive_loop(model, processor, device, items, prompt: str, gen_kwargs: dict, stop_ids) -> dict[str, str]:
    """What the original tool did: one image at a time, open, process, generate, decode."""
    import torch
    from PIL import Image

    out = {}
    for image_id, path in items:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=prompt, images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            ids = model.generate(**inputs, **gen_kwargs, eos_token_id=stop_ids,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        out[image_id] = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def pure_generate(model, processor, device, items, prompt: str, gen_kwargs: dict, stop_ids, batch_size: int) -> float:
    """Seconds spent in model.generate alone, on batches preprocessed beforehand."""
    collate = Collate(processor, prompt)
    batches = [collate([(i, load_image(p), None) for i, p in items[s:s + batch_size]])
               for s in range(0, len(items), batch_size)]
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        generate_texts(model, processor.tokenizer, batch.inputs, device, gen_kwargs, stop_ids)
    sync(device)
    return time.perf_counter() - start


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_run(bundle, image_dir: Path, prompt: str, gen_kwargs: dict, batch_size: int, workers: int | None,
               work: Path) -> tuple[dict[str, str], float]:
    out = work / f"engine_b{batch_size}_w{workers}.csv"
    cfg = common.RunConfig(task="caption", image_dir=str(image_dir), output_csv=str(out), model=ModelSpec(),
                           prompt=prompt, gen_kwargs=gen_kwargs, batch_size=batch_size, num_workers=workers,
                           journal_path=work / f"{out.stem}.journal.jsonl", overwrite=True)
    sync(bundle[2])
    start = time.perf_counter()
    result = common.run_generation(cfg, model_bundle=bundle)
    sync(bundle[2])
    seconds = time.perf_counter() - start
    return {i: result.records[i]["text"] for i in result.ids}, seconds


def load_bundle(args, work: Path):
    import torch

    if not args.full_size:
        folder = build_tiny_llava(work / "tiny-llava")
        return load_model(ModelSpec(str(folder), None, device="cpu")), "tiny LLaVA (CPU, float32)"
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    # The 8B architecture with random weights; the tiny tokenizer/processor supply prompts (its ids
    # all lie inside the 128320-token vocabulary), so prompts are ~600 tokens like the real ones.
    folder = build_tiny_llava(work / "tiny-llava")
    processor = load_processor(str(folder))
    config = llava_llama3_8b_config()
    config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    if args.layers:
        config.text_config.num_hidden_layers = args.layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    label = f"LLaVA-LLaMA-3-8B shape, random weights ({device}, {dtype})"
    if args.load_in_4bit:
        # bitsandbytes quantizes on load: save once, reload with the same config as the engine.
        saved = work / "full"
        model.save_pretrained(saved)
        del model
        torch.cuda.empty_cache()
        model = LlavaForConditionalGeneration.from_pretrained(
            saved, dtype=dtype, device_map={"": device},
            quantization_config=quantization_config(dtype) if BitsAndBytesConfig else None).eval()
        label += ", 4-bit NF4"
    return (model, processor, input_device(model)), label


def throughput(args) -> None:
    import torch

    work = Path(tempfile.mkdtemp(prefix="jj-vmed-bench-"))
    try:
        torch.manual_seed(0)
        bundle, label = load_bundle(args, work)
        model, processor, device = bundle
        stop_ids = model.stop_token_ids(processor.tokenizer, model.generation_config)
        images = image_folder(Path(args.image_dir), args.num_images, work / "images")
        items = list_images(images)
        prompt = common.build_prompt("vicuna", common.INSTRUCTIONS[("caption", "es")])
        gen_kwargs = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                      "do_sample": False, "num_beams": 1}

        # warm-up (allocator, kernels) on two images, not timed
        naive_loop(model, processor, device, items[:2], prompt, gen_kwargs, stop_ids)

        rows = []
        gpu_peak_reset()
        with PeakMemory() as mem:
            start = time.perf_counter()
            baseline = naive_loop(model, processor, device, items, prompt, gen_kwargs, stop_ids)
            sync(device)
            seconds = time.perf_counter() - start
        rows.append(("naive loop (1 image at a time)", 1, "-", seconds, None, mem.peak, gpu_peak(), True))
        for bs in args.batch_sizes:
            gpu_peak_reset()
            with PeakMemory() as mem:
                texts, seconds = engine_run(bundle, images, prompt, gen_kwargs, bs, args.num_workers, work)
            gen_only = pure_generate(model, processor, device, items, prompt, gen_kwargs, stop_ids, bs)
            same = texts == baseline
            rows.append((f"engine, batch {bs}", bs, args.num_workers, seconds, gen_only, mem.peak, gpu_peak(), same))
        workers = common.cpu_split(device.type, args.num_workers)  # what the engine chose, for the header

        n = len(items)
        base_rate = n / rows[0][3]
        print(f"\n{label}; {n} images from {args.image_dir}; {args.max_new_tokens} new tokens per image; "
              f"torch {torch.__version__}, {os.cpu_count()} cores, engine: {workers} decode workers")
        print(f"| {'configuration':<32} | {'images/s':>8} | {'vs naive':>8} | {'generate-only images/s':>22} | "
              f"{'overhead':>8} | {'peak PSS MiB':>12} | {'peak GPU MiB':>12} | same output |")
        print(f"|{'-' * 34}|{'-' * 10}|{'-' * 10}|{'-' * 24}|{'-' * 10}|{'-' * 14}|{'-' * 14}|{'-' * 13}|")
        for name, _, _, seconds, gen_only, rss, gpu, same in rows:
            rate = n / seconds
            gen_rate = f"{n / gen_only:.2f}" if gen_only else "-"
            overhead = f"{seconds / gen_only:.2f}x" if gen_only else "-"
            print(f"| {name:<32} | {rate:>8.2f} | {rate / base_rate:>7.2f}x | {gen_rate:>22} | {overhead:>8} | "
                  f"{rss / 2**20:>12.0f} | {gpu / 2**20:>12.0f} | {'yes' if same else 'NO':>11} |")
        if not all(r[-1] for r in rows):
            print("WARNING: some configuration did not reproduce the baseline's answers")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory_child(count: int, work: str) -> None:
    """One engine run over `count` small images in a fresh process; prints its peak memory (JSON)."""
    folder = build_tiny_llava(Path(work) / f"tiny-{count}")
    bundle = load_model(ModelSpec(str(folder), None, device="cpu"))
    prompt = common.build_prompt("vicuna", "x")
    out = Path(work) / f"mem-{count}.csv"
    cfg = common.RunConfig(task="caption", image_dir=str(Path(work) / "small"), output_csv=str(out),
                           model=ModelSpec(), prompt=prompt,
                           gen_kwargs={"max_new_tokens": 2, "min_new_tokens": 2, "do_sample": False},
                           batch_size=16, num_workers=2, limit=count, journal_path=out.with_suffix(".jsonl"),
                           overwrite=True)
    with PeakMemory(every=0.005) as mem:
        common.run_generation(cfg, model_bundle=bundle)
    print(json.dumps({"images": count, "peak_rss": mem.peak}))


def memory(args) -> None:
    """Peak memory (PSS) for 200 vs 2000 images: per-image state must not accumulate."""
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="jj-vmed-mem-"))
    try:
        (work / "small").mkdir()
        for i in range(2000):
            Image.new("RGB", (64, 64), (i % 256, (i * 7) % 256, 90)).save(work / "small" / f"s_{i:05d}.png")
        peaks = {}
        for count in (200, 2000):
            out = subprocess.run([sys.executable, __file__, "--_memory_child", str(count), str(work)],
                                 capture_output=True, text=True, check=True)
            peaks[count] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss"]
        print("\n| images | peak PSS MiB (process + workers) |\n|---|---|")
        for count, peak in peaks.items():
            print(f"| {count} | {peak / 2**20:.0f} |")
        print(f"2000 vs 200 images: {peaks[2000] / peaks[200]:.3f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resume(args) -> None:
    """Time from the start of a resumed run to its first new batch, with a 20,000-record journal."""
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="jj-vmed-resume-"))
    try:
        folder = build_tiny_llava(work / "tiny")
        bundle = load_model(ModelSpec(str(folder), None, device="cpu"))
        images = work / "images"
        images.mkdir()
        Image.new("RGB", (32, 32)).save(images / "img_00000.png")
        for i in range(1, 20_001):  # the 20,000 finished images (never decoded: they are skipped)
            os.link(images / "img_00000.png", images / f"img_{i:05d}.png")
        prompt = common.build_prompt("vicuna", "x")
        gen = {"max_new_tokens": 1, "min_new_tokens": 1, "do_sample": False}
        out = work / "c.csv"
        journal = work / "c.journal.jsonl"
        settings = common.RunConfig(task="caption", image_dir=str(images), output_csv=str(out),
                                    model=ModelSpec(), prompt=prompt, gen_kwargs=gen).settings()
        with open(journal, "w") as fh:
            fh.write(json.dumps({"journal": "jj-vmed", "version": 1, "settings": settings}) + "\n")
            for i in range(1, 20_001):
                fh.write(json.dumps({"id": f"img_{i:05d}", "text": "a previous caption " * 5, "error": None}) + "\n")
        cfg = common.RunConfig(task="caption", image_dir=str(images), output_csv=str(out), model=ModelSpec(),
                               prompt=prompt, gen_kwargs=gen, batch_size=1, num_workers=0, resume="auto",
                               journal_path=journal)
        first_batch = {}
        original = common.generate_texts

        def timed(*a, **k):
            first_batch.setdefault("t", time.perf_counter())
            return original(*a, **k)

        common.generate_texts = timed
        start = time.perf_counter()
        result = common.run_generation(cfg, model_bundle=bundle)
        common.generate_texts = original
        assert result.generated == 1 and len(result.ids) == 20_001
        print(f"\nresume with a 20,000-record journal: {first_batch['t'] - start:.3f} s to the first new batch")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", default=str(DEFAULT_IMAGES), help="images to cycle through")
    parser.add_argument("--num_images", type=int, default=96)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--num_workers", type=int, default=None, help="default: the engine's own choice")
    parser.add_argument("--full_size", action="store_true", help="8B-shaped model with random weights (GPU)")
    parser.add_argument("--layers", type=int, default=None, help="with --full_size: fewer text layers (smoke test)")
    parser.add_argument("--load_in_4bit", action="store_true", help="with --full_size: NF4 4-bit")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory at 200 vs 2000 images")
    parser.add_argument("--resume", action="store_true", help="also time a resume from a 20,000-record journal")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--_memory_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        memory_child(int(args._memory_child[0]), args._memory_child[1])
        return
    if not args.skip_throughput:
        throughput(args)
    if args.memory:
        memory(args)
    if args.resume:
        resume(args)


if __name__ == "__main__":
    main()
