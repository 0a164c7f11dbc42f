"""Throughput: the naive one-image loop, `model.generate` alone, and the engine, in a fair race.

    python benchmarks/throughput.py                          # CPU, tiny test model (built offline)
    python benchmarks/throughput.py --memory --resume        # also: memory at 200 vs 2000 images, resume cost
    benchmarks/gpu.sh                                        # GPU: LLaVA-LLaMA-3-8B-shaped, random bf16 weights

Contenders, each at every batch size asked for (`auto` too), eager and/or compiled (--compile):
- naive loop: what the original tool did, one image at a time: open, process, generate, decode;
- generate only: the generation core (generation.generate_batches) on batches preprocessed beforehand;
- engine: the engine's loader (decode workers, pinned memory on CUDA, the CPU split of common.cpu_split)
  feeding the same generation core.

Fair: every contender gets the same torch threads; they run interleaved (A B C, B C A, ...) and
repeated, and the table gives min / median / max images/s. Identical work: the same images, each with
one of three prompts of different lengths (so batches are left-padded), greedy decoding forced to a
fixed length. Answers are checked: on CPU every run must give exactly the first row's answers; on a
GPU, bf16 kernels change with the batch shape, so the share of identical answers is shown and must
reach --agreement. Compiled rows are checked against the eager row of the same batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tiny model fixture lives with the tests

from tiny_llava import build_tiny_llava, llava_llama3_8b_config  # noqa: E402

import common  # noqa: E402
from jjvmed import generation, prompts  # noqa: E402
from jjvmed.errors import UserError, first_line  # noqa: E402
from jjvmed.images import Batch, ImageDataset, list_images, load_image  # noqa: E402
from jjvmed.model import ModelSpec, input_device, load_model, load_processor, quantization_config, stop_token_ids  # noqa: E402

DEFAULT_IMAGES = ROOT / "tests" / "data" / "real_images"
# Image i gets prompt i % 3: the caption and concept instructions the tool uses, and a short one.
PROMPTS = [
    prompts.task_prompt("caption", "vicuna", "es"),
    prompts.task_prompt("concepts", "vicuna", "es"),
    prompts.build_prompt("vicuna", "Describe la imagen."),
]


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
    def pss(pid: int) -> int:
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
        return self.pss(me) + sum(self.pss(c) for c in self.children(me))

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


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def gpu_peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak(device) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def synthetic_images(out: Path) -> Path:
    """Twelve PNGs from 512 to 2048 px a side (smooth gradients and noise, so they decode like scans), for
    machines without the project's sample images."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        side = 512 + i * 140
        ramp = np.linspace(0, 200, side, dtype=np.float32)
        pixels = ramp[None, :] * 0.5 + ramp[:, None] * 0.3 + rng.normal(0, 12, (side, side))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(out / f"synthetic_{i:02d}.png")
    return out


def image_folder(source: Path, count: int, out: Path) -> Path:
    """`count` images, cycling through the source images (symlinks, so decoding cost is real)."""
    try:
        sources = [Path(p) for _, p in list_images(source)]
    except UserError:
        print(f"no images in {source}: using synthetic images", flush=True)
        sources = [Path(p) for _, p in list_images(synthetic_images(out.parent / "synthetic"))]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = sources[i % len(sources)]
        (out / f"img_{i:05d}{src.suffix}").symlink_to(src.resolve())
    return out


class MixedPromptCollate:
    """The engine's collate step (images.Collate) with each image's own prompt, by its position."""

    def __init__(self, processor, prompts: dict[str, str]):
        self.processor = processor
        self.prompts = prompts

    def __call__(self, samples: list) -> Batch:
        ids = [i for i, _, _ in samples]
        inputs = self.processor(text=[self.prompts[i] for i in ids], images=[img for _, img, _ in samples],
                                return_tensors="pt", padding=True)
        return Batch(ids, dict(inputs), [])


# ---------------------------------------------------------------------------------------------
# The contenders. Each returns {ID: answer}.
# ---------------------------------------------------------------------------------------------


def naive_loop(model, processor, items, prompts: dict[str, str], gen_kwargs: dict, **_) -> dict[str, str]:
    """What the original tool did: one image at a time, open, process, generate, decode."""
    import torch
    from PIL import Image

    device = input_device(model)
    stop_ids = stop_token_ids(processor.tokenizer, model.generation_config)
    out = {}
    for image_id, path in items:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=prompts[image_id], images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            ids = model.generate(**inputs, **gen_kwargs, eos_token_id=stop_ids,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        out[image_id] = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def generate_only(model, processor, items, prompts, gen_kwargs, batch_size: int, batches: list[Batch],
                  generator, **_) -> dict[str, str]:
    """The generation core alone, on batches preprocessed beforehand (untimed)."""
    records = generation.generate_batches(model, processor, batches, gen_kwargs, generator=generator)
    return {r.id: r.text for batch in records for r in batch}


def engine(model, processor, items, prompts, gen_kwargs, batch_size: int, workers: int, generator,
           **_) -> dict[str, str]:
    """The engine's loader (images.make_loader's settings, per-image prompts) and generation core."""
    from torch.utils.data import DataLoader

    device = input_device(model)
    with common.cpu_split(device.type, workers) as n:
        loader = DataLoader(ImageDataset(items), batch_size=batch_size, shuffle=False, num_workers=n,
                            collate_fn=MixedPromptCollate(processor, prompts), pin_memory=device.type == "cuda",
                            prefetch_factor=4 if n > 0 else None)
        records = generation.generate_batches(model, processor, loader, gen_kwargs, generator=generator)
        return {r.id: r.text for batch in records for r in batch}


CONTENDERS = {"naive": naive_loop, "generate": generate_only, "engine": engine}


@dataclass
class Config:
    name: str
    contender: str
    batch_size: int
    compiled: bool
    items: list[tuple[str, str]]
    generator: Callable | None = None  # the compiled path's generator, kept across runs (one cache, one compile)
    warmup_s: float = 0.0  # the first, untimed run (compiling, for --compile)
    rates: list[float] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    pss: int = 0
    gpu: int = 0
    stable: bool = True  # every repeat gave the same answers
    error: str = ""  # why it could not run
    agreement: tuple[int, int] | None = None  # identical answers, answers compared
    reference: str = ""


def load_bundle(args, work: Path):
    """(model, processor, label): the tiny LLaVA, or the 8B shape with random weights built on the device."""
    import torch

    folder = build_tiny_llava(work / "tiny-llava")
    if not args.full_size:
        model, processor, _ = load_model(ModelSpec(str(folder), None, device="cpu"))
        return model, processor, "tiny LLaVA (CPU, float32)"
    from transformers import LlavaForConditionalGeneration

    # The tiny tokenizer/processor supply the prompts (its ids all lie inside the 128320-token vocabulary),
    # so prompts are ~600 tokens like the real ones.
    processor = load_processor(str(folder))
    config = llava_llama3_8b_config()
    config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    if args.layers:
        config.text_config.num_hidden_layers = args.layers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Built where it runs, in its dtype: no 33 GB float32 copy first.
    with device:
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        # Random weights give near-tied logits that bf16 rounding flips from one batch shape to another;
        # a wider lm_head separates the winner, as a trained model's does.
        model.lm_head.weight.normal_(0.0, 0.1)
    model.eval()
    label = f"LLaVA-LLaMA-3-8B shape, random weights ({device.type}, {str(dtype).removeprefix('torch.')})"
    if args.layers:
        label += f", {args.layers} text layers"
    if args.load_in_4bit:
        # bitsandbytes quantizes on load: save once, reload with the engine's quantization settings.
        saved = work / "full"
        model.save_pretrained(saved)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = LlavaForConditionalGeneration.from_pretrained(
            saved, dtype=dtype, device_map={"": str(device)}, quantization_config=quantization_config(dtype)).eval()
        label += ", 4-bit NF4"
    return model, processor, label


def resolve_batch_sizes(args, model, processor, gen_kwargs: dict) -> dict[str, int]:
    """The batch sizes asked for; `auto` probed once, for the compiled path's static cache (the same
    KV memory as the eager path's full-grown cache), so both modes race at the same size."""
    sizes = {}
    for b in args.batch_sizes:
        if b == "auto":
            sizes["auto"] = generation.auto_batch_size(model, processor, max(PROMPTS, key=len), gen_kwargs,
                                                       args.max_images, static_cache=True).size
        else:
            sizes[b] = int(b)
    return sizes


def table(configs: list[Config], header: str, cuda: bool) -> str:
    naive = next((c for c in configs if c.contender == "naive" and c.rates), None)
    base = statistics.median(naive.rates) if naive else None
    lines = [header, "",
             "| configuration | images | images/s min / median / max | vs naive | first run s | peak PSS MiB"
             + (" | peak GPU MiB" if cuda else "") + " | same answers |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---|"]
    for c in configs:
        if not c.rates:
            why = f"failed: {c.error}" if c.error else "not run (time budget)"
            lines.append(f"| {c.name} | {len(c.items)} | {why} | | | |" + (" |" if cuda else "") + " |")
            continue
        med = statistics.median(c.rates)
        same = c.reference or "-" if c.agreement is None else \
            f"{c.agreement[0]}/{c.agreement[1]}" + (f" vs {c.reference}" if c.reference else "")
        if not c.stable:
            same += ", CHANGED between repeats"
        lines.append(f"| {c.name} | {len(c.items)} | {min(c.rates):.2f} / {med:.2f} / {max(c.rates):.2f} | "
                     + (f"{med / base:.2f}x" if base else "-") + f" | {c.warmup_s:.1f} | {c.pss / 2**20:.0f}"
                     + (f" | {c.gpu / 2**20:.0f}" if cuda else "") + f" | {same} |")
    return "\n".join(lines)


def throughput(args) -> bool:
    """Run the race and print the table; False if some configuration's answers disagree."""
    import torch

    start_time = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="jj-vmed-bench-"))
    try:
        torch.manual_seed(0)
        model, processor, label = load_bundle(args, work)
        device = input_device(model)
        cuda = device.type == "cuda"
        cores = os.cpu_count() or 1
        workers = args.num_workers if args.num_workers is not None else \
            (min(4, max(1, cores - 1)) if cuda else max(1, cores // 2))
        threads = args.threads or (torch.get_num_threads() if cuda else max(1, cores - workers))
        torch.set_num_threads(threads)  # every contender; the engine's cpu_split sets the same on CPU
        gen_kwargs = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                      "do_sample": False, "num_beams": 1}
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        sizes = resolve_batch_sizes(args, model, processor, gen_kwargs)
        needed = max(max(args.num_images, args.batches_per_config * b) for b in sizes.values())
        folder = image_folder(Path(args.image_dir), min(needed, args.max_images), work / "images")
        all_items = list_images(folder)
        prompts = {i: PROMPTS[k % len(PROMPTS)] for k, (i, _) in enumerate(all_items)}

        configs: list[Config] = []
        for compiled in modes:
            suffix = ", compiled" if compiled else ""
            if "naive" in args.contenders and not compiled:
                configs.append(Config("naive loop (1 image at a time)", "naive", 1, False,
                                      all_items[:args.num_images]))
            for key, b in sizes.items():
                count = min(max(args.num_images, args.batches_per_config * b), len(all_items))
                shown = f"auto = {b}" if key == "auto" else str(b)
                for contender in ("generate", "engine"):
                    if contender in args.contenders:
                        name = f"{'generate only' if contender == 'generate' else 'engine'}, batch {shown}{suffix}"
                        configs.append(Config(name, contender, b, compiled, all_items[:count]))

        header = (f"{label}; images cycled from {args.image_dir}, 3 prompts of different lengths; "
                  f"{args.max_new_tokens} new tokens per image; torch {torch.__version__}, {cores} cores, "
                  f"torch threads {threads} for every contender, engine: {workers} decode workers; "
                  f"{args.repeats} interleaved repeats" + (f"; {torch.cuda.get_device_name()}" if cuda else ""))
        print(header, flush=True)

        collate = MixedPromptCollate(processor, prompts)

        def run(c: Config, items: list[tuple[str, str]]) -> tuple[dict[str, str], float]:
            """One timed run of `c` over `items`; generate-only's batches are preprocessed first, untimed."""
            batches = [collate([(i, load_image(p), None) for i, p in items[s:s + c.batch_size]])
                       for s in range(0, len(items), c.batch_size)] if c.contender == "generate" else []
            sync(device)
            t0 = time.perf_counter()
            texts = CONTENDERS[c.contender](model, processor, items, prompts, gen_kwargs, batch_size=c.batch_size,
                                            workers=workers, batches=batches, generator=c.generator)
            sync(device)
            return texts, time.perf_counter() - t0

        def over_budget() -> bool:
            return bool(args.budget_s) and time.perf_counter() - start_time > args.budget_s

        tokenizer = processor.tokenizer
        stop_ids = stop_token_ids(tokenizer, model.generation_config)

        def set_up(c: Config) -> None:
            """Make the compiled generator, and one untimed run of one batch (the compile, the allocator's
            first growth)."""
            if c.compiled:
                c.generator = generation.StaticGenerator(model, tokenizer, gen_kwargs, stop_ids, c.batch_size,
                                                         args.compile_backend)
            _, c.warmup_s = run(c, c.items[:c.batch_size])
            print(f"ready: {c.name} (first run {c.warmup_s:.1f} s)", flush=True)

        # Round 0 sets each configuration up and times it once, in order, so a time budget that runs out
        # (compiling is slow) still leaves a number for every configuration reached; later rounds are
        # interleaved, each starting one configuration further on.
        for r in range(args.repeats):
            ready = [c for c in configs if c.rates]
            order = configs if r == 0 else ready[r % len(ready):] + ready[:r % len(ready)]
            for c in order:
                if over_budget():
                    break
                gpu_peak_reset(device)
                try:
                    if r == 0:
                        set_up(c)
                    with PeakMemory() as mem:
                        texts, seconds = run(c, c.items)
                except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others' numbers
                    traceback.print_exc()
                    c.error, c.generator = first_line(e), None
                    print(f"{c.name}: failed: {c.error}", flush=True)
                    continue
                c.rates.append(len(c.items) / seconds)
                c.pss, c.gpu = max(c.pss, mem.peak), max(c.gpu, gpu_peak(device))
                c.stable = c.stable and (not c.texts or texts == c.texts)
                c.texts = c.texts or texts
                print(f"{c.name}: {c.rates[-1]:.2f} images/s", flush=True)
                write_table(args, table(configs, header, cuda))

        ok = check_answers(configs, cuda, args.agreement)
        text = table(configs, header, cuda)
        if not ok:
            text += "\nWARNING: some configuration did not reproduce the reference answers"
        write_table(args, text)
        print("\n" + text)
        return ok
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_answers(configs: list[Config], cuda: bool, agreement: float) -> bool:
    """Compare every configuration with its reference: compiled rows with the eager row of their batch
    size, the others with the first row, on the images both ran. The first row's own repeats count too."""
    done = [c for c in configs if c.texts]
    if not done:
        return False
    first = done[0]
    ok = not any(c.error for c in configs)
    first.reference = "reference"
    for c in done[1:]:
        eager = next((e for e in done if not e.compiled and e.contender == c.contender
                      and e.batch_size == c.batch_size), None) if c.compiled else None
        ref = eager or first
        shared = [i for i in c.texts if i in ref.texts]
        same = sum(c.texts[i] == ref.texts[i] for i in shared)
        c.agreement = (same, len(shared))
        c.reference = "eager" if ref is not first else ""
        if same < (agreement * len(shared) if cuda else len(shared)):
            ok = False
    return ok and all(c.stable for c in done)  # a configuration answering differently between repeats: never


def write_table(args, text: str) -> None:
    if args.table:
        from jjvmed.files import write_text_atomic

        write_text_atomic(args.table, text + "\n")


# ---------------------------------------------------------------------------------------------
# Memory and resume, through the engine's own run (common.run's path)
# ---------------------------------------------------------------------------------------------


def memory_child(count: int, work: str) -> None:
    """One engine run over `count` small images in a fresh process; prints its peak memory (JSON)."""
    folder = build_tiny_llava(Path(work) / f"tiny-{count}")
    bundle = load_model(ModelSpec(str(folder), None, device="cpu"))
    out = Path(work) / f"mem-{count}.csv"
    cfg = common.RunConfig(task="caption", image_dir=str(Path(work) / "small"), output_csv=str(out),
                           model=ModelSpec(str(folder), None, device="cpu"), prompt=prompts.build_prompt("vicuna", "x"),
                           gen_kwargs={"max_new_tokens": 2, "min_new_tokens": 2, "do_sample": False},
                           batch_size=16, num_workers=2, limit=count, overwrite=True)
    with PeakMemory(every=0.005) as mem:
        result = common.generate_run(cfg, common.select_images(cfg.image_dir, None, count), bundle)
    assert result.generated == count
    print(json.dumps({"images": count, "peak_pss": mem.peak}))


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
            peaks[count] = json.loads(out.stdout.strip().splitlines()[-1])["peak_pss"]
        print("\n| images | peak PSS MiB (process + workers) |\n|---|---|")
        for count, peak in peaks.items():
            print(f"| {count} | {peak / 2**20:.0f} |")
        print(f"2000 vs 200 images: {peaks[2000] / peaks[200]:.3f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resume(args) -> None:
    """Time from the start of a resumed run to its first new batch, with a 20,000-record journal."""
    from PIL import Image

    from jjvmed.journal import file_identity, header_line, record_line
    from jjvmed.records import Record

    work = Path(tempfile.mkdtemp(prefix="jj-vmed-resume-"))
    try:
        folder = build_tiny_llava(work / "tiny")
        spec = ModelSpec(str(folder), None, device="cpu")
        bundle = load_model(spec)
        images = work / "images"
        images.mkdir()
        Image.new("RGB", (32, 32)).save(images / "img_00000.png")
        for i in range(1, 20_001):  # the 20,000 finished images (never decoded: they are skipped)
            os.link(images / "img_00000.png", images / f"img_{i:05d}.png")
        out = work / "c.csv"
        cfg = common.RunConfig(task="caption", image_dir=str(images), output_csv=str(out), model=spec,
                               prompt=prompts.build_prompt("vicuna", "x"),
                               gen_kwargs={"max_new_tokens": 1, "min_new_tokens": 1, "do_sample": False},
                               batch_size=1, num_workers=0, resume="auto")
        with open(cfg.journal_path, "wb") as fh:
            fh.write(header_line(cfg.settings("float32"), os.path.abspath(images)))
            for i in range(1, 20_001):
                name = f"img_{i:05d}"
                fh.write(record_line(Record(name, "a previous caption " * 5), file_identity(images / f"{name}.png")))
        first_batch = {}
        original = common.generate_batches

        def timed(*a, **k):
            for records in original(*a, **k):
                first_batch.setdefault("t", time.perf_counter())
                yield records

        common.generate_batches = timed
        start = time.perf_counter()
        result = common.generate_run(cfg, common.select_images(cfg.image_dir, None, None), bundle)
        common.generate_batches = original
        assert result.generated == 1 and len(result.ids) == 20_001
        print(f"\nresume with a 20,000-record journal: {first_batch['t'] - start:.3f} s to the first new batch "
              "(its generation included)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def batch_size_arg(text: str) -> str:
    if text != "auto" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", default=str(DEFAULT_IMAGES), help="images to cycle through")
    parser.add_argument("--num_images", type=int, default=48, help="images per configuration (at least)")
    parser.add_argument("--batches_per_config", type=int, default=0,
                        help="...or this many batches per configuration, if more (large batches on a GPU)")
    parser.add_argument("--max_images", type=int, default=2048, help="never more images than this per configuration")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--batch_sizes", type=batch_size_arg, nargs="+", default=["1", "4", "8", "16"])
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="eager generation, compiled (static cache + torch.compile), or both")
    parser.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=None, help="default: the engine's own choice")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every contender (default: on CPU the cores the engine's decode "
                        "workers leave, as the engine does; on a GPU torch's default)")
    parser.add_argument("--agreement", type=float, default=0.9,
                        help="on a GPU, the share of identical answers each configuration must reach")
    parser.add_argument("--budget_s", type=float, default=0,
                        help="start no new run after this many seconds (partial table; 0: no limit)")
    parser.add_argument("--table", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--full_size", action="store_true", help="8B-shaped model with random weights (GPU)")
    parser.add_argument("--layers", type=int, default=None, help="with --full_size: fewer text layers (smoke test)")
    parser.add_argument("--load_in_4bit", action="store_true", help="with --full_size: NF4 4-bit (needs bitsandbytes)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory at 200 vs 2000 images")
    parser.add_argument("--resume", action="store_true", help="also time a resume from a 20,000-record journal")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--_memory_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        memory_child(int(args._memory_child[0]), args._memory_child[1])
        return 0
    ok = True
    if not args.skip_throughput:
        ok = throughput(args)
    if args.memory:
        memory(args)
    if args.resume:
        resume(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
