"""Throughput: the naive one-image loop, `model.generate` alone, and the engine, in a fair race.

    python benchmarks/throughput.py                          # CPU, tiny test model (built offline)
    python benchmarks/throughput.py --memory --resume        # also: memory at 200 vs 2000 images, resume cost
    bash benchmarks/gpu.sh                                   # GPU: LLaVA-LLaMA-3-8B-shaped, random bf16 weights
    bash benchmarks/gpu.sh --dry-run                         # the same plan on CPU, tiny model, 2 new tokens

Contenders, each at every batch size asked for (`auto` too), compiled (--compile) and/or eager:
- naive loop: what the original tool did, one image at a time: open, process, generate, decode;
- generate only: the generation core (generation.generate_batches) on inputs preprocessed once, before any
  timing, and reused by every configuration (each image file decoded and resized once, each prompt
  tokenized once; all rows left-padded to one length, so every batch has the same prompt length);
- engine: the engine's loader (decode workers, pinned memory on CUDA, the CPU split of sources.cpu_split)
  feeding the same generation core.
`--ab_batch_size N` adds rows at batch N with transformers' own SDPA attention, which repeats K/V for
every query head in decoding steps with a mask (jjvmed/attention.py), against the grouped attention the
tool loads.

Fair: every contender gets the same torch threads; they run interleaved (A B C, B C A, ...) and repeated,
and the table gives min / median / max images/s. Identical work: the same images, each with one of three
prompts of different lengths, greedy decoding forced to a fixed length. Each configuration is first run
once untimed on every prompt length it will be timed on (for --compile: the compile), and a recompile
inside a timed run is reported in the row. Answers are compared as token IDs (the random 8B-shaped model
picks IDs that the small tokenizer here has no text for): on CPU every run must give exactly the
reference's tokens; on a GPU bf16 kernels change with the batch shape, so a share of the answers must
agree on their first `--agreement_tokens` tokens (the prefill's and the first decoding steps'), and the
identical answers and the mean common prefix are shown. Each row's reference is the eager row of its batch
size with the grouped attention, else the first such eager row.

`--budget_s`: no configuration starts when the time spent plus what it is expected to take (its last run;
for its first run, the slowest first run of its mode so far) would pass the budget. A SIGTERM (`timeout`)
or Ctrl-C stops the run and prints the table so far; the table file is rewritten after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
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

from tiny_llava import build_tiny_llava, llava_llama3_8b_config, tiny_config  # noqa: E402

from jjvmed import attention, generation, prompts  # noqa: E402
from jjvmed.errors import UserError, first_line  # noqa: E402
from jjvmed.images import Batch, ImageDataset, list_images, load_image  # noqa: E402
from jjvmed.model import ModelSpec, input_device, load_model, load_processor, quantization_config, stop_token_ids  # noqa: E402
from jjvmed.pipeline import RunConfig, select  # noqa: E402
from jjvmed.sources import GenerateSource, Generation, cpu_split  # noqa: E402

DEFAULT_IMAGES = ROOT / "tests" / "data" / "real_images"
# Image i gets prompt i % 3: the caption and concept instructions the tool uses, and a short one.
PROMPTS = [
    prompts.task_prompt("caption", "vicuna", "es"),
    prompts.task_prompt("concepts", "vicuna", "es"),
    prompts.build_prompt("vicuna", "Describe la imagen."),
]
# transformers' own SDPA attention: with a mask (a static cache always has one) it repeats K/V for every query
# head, in every decoding step on 5.17 and under torch.compile on 5.24 (5.24's eager decoding groups them).
STOCK_SDPA = "sdpa"
DRY_RUN_HEADS, DRY_RUN_KV_HEADS = 8, 2  # the 8B's grouped-query ratio (32 / 8) on the dry run's tiny model


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


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (a new one inside a timed run is a recompile)."""
    import torch._dynamo

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


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


def preprocess_once(processor, items: list[tuple[str, str]], prompts: dict[str, str], device, dtype) -> dict:
    """The processor's output for all `items` as one batch, on the device in the model's dtype, built from
    each distinct image file and prompt processed once: (input_ids, attention_mask) left-padded to the
    longest prompt, pixel_values. Every configuration slices its batches from it, untimed."""
    import torch

    pixels: dict[str, torch.Tensor] = {}
    for _, path in items:
        real = str(Path(path).resolve())
        if real not in pixels:
            pixels[real] = processor.image_processor(images=[load_image(path)], return_tensors="pt")["pixel_values"][0]
    any_image = load_image(items[0][1])
    tokens = {p: processor(text=[p], images=[any_image], return_tensors="pt")["input_ids"][0]
              for p in set(prompts.values())}
    longest = max(len(t) for t in tokens.values())
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.full((len(items), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, (image_id, _) in enumerate(items):
        ids = tokens[prompts[image_id]]
        input_ids[row, longest - len(ids):] = ids  # left padding, as the engine's processor pads
        mask[row, longest - len(ids):] = 1
    pixel_values = torch.stack([pixels[str(Path(p).resolve())] for _, p in items])
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "pixel_values": pixel_values.to(device, dtype)}


class TokenIds:
    """The tokenizer's part in decoding answers, writing each answer as its token IDs ("17 4 933"): the
    random 8B-shaped model picks IDs that the small tokenizer here has no text for, and would decode to ''."""

    def __init__(self, tokenizer):
        self.pad_token_id = tokenizer.pad_token_id

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(str(int(t)) for t in row) for row in rows]

    def decode(self, row, skip_special_tokens: bool = True) -> str:
        return self.batch_decode([row])[0]


# ---------------------------------------------------------------------------------------------
# The contenders. Each returns {ID: answer as token IDs}.
# ---------------------------------------------------------------------------------------------


def naive_loop(model, processor, items, prompts: dict[str, str], gen_kwargs: dict, **_) -> dict[str, str]:
    """What the original tool did: one image at a time, open, process, generate, decode."""
    import torch
    from PIL import Image

    device = input_device(model)
    stop_ids = stop_token_ids(processor.tokenizer, model.generation_config)
    decoder = TokenIds(processor.tokenizer)
    out = {}
    for image_id, path in items:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=prompts[image_id], images=image, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            ids = model.generate(**inputs, **gen_kwargs, eos_token_id=stop_ids,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        out[image_id] = decoder.decode(ids[0, inputs["input_ids"].shape[1]:])
    return out


def generate_only(model, processor, items, prompts, gen_kwargs, batches: list[Batch], generator,
                  **_) -> dict[str, str]:
    """The generation core alone, on batches preprocessed once, before any timing."""
    records = generation.generate_batches(model, processor, batches, gen_kwargs, generator=generator)
    return {r.id: r.text for batch in records for r in batch}


def engine(model, processor, items, prompts, gen_kwargs, batch_size: int, workers: int, generator,
           **_) -> dict[str, str]:
    """The engine's loader (images.make_loader's settings, per-image prompts) and generation core."""
    from torch.utils.data import DataLoader

    device = input_device(model)
    with cpu_split(device.type, workers) as n:
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
    attention: str = attention.GROUPED_SDPA
    generator: Callable | None = None  # kept across runs: the compiled path's one cache and one compile
    batches: list[Batch] = field(default_factory=list)  # generate only: slices of the inputs preprocessed once
    warmup_s: float = 0.0  # the untimed first runs, one per prompt length (compiling, for --compile)
    rates: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    pss: int = 0
    gpu: int = 0
    stable: bool = True  # every repeat gave the same answers
    recompiled: int = 0  # graphs compiled inside timed runs (each a recompile that was timed)
    error: str = ""  # why it could not run
    agreement: str = ""  # how its answers compare with its reference's
    reference: str = ""


def random_model(config, device, dtype):
    """A LLaVA with random weights built where it runs, in its dtype (no 33 GB float32 copy of the 8B first)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with device:
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                           attn_implementation=attention.register())
    with torch.no_grad():
        # Random weights give near-tied logits that bf16 rounding flips from one batch shape to another;
        # a wider lm_head separates the winner, as a trained model's does.
        model.lm_head.weight.normal_(0.0, 0.1)
    return model.eval()


def load_bundle(args, work: Path):
    """(model, processor, label): the tiny LLaVA as the engine loads it; with --full_size the 8B shape with
    random weights built on the device; with --dry_run the same build on CPU at a tiny size with the 8B's
    grouped-query ratio."""
    import torch

    if not (args.full_size or args.dry_run):
        folder = build_tiny_llava(work / "tiny-llava")
        model, processor, _ = load_model(ModelSpec(str(folder), None, device="cpu"))
        return model, processor, "tiny LLaVA (CPU, float32)"
    # The tiny tokenizer/processor supply the prompts (its ids all lie inside the 128320-token vocabulary),
    # so prompts are ~600 tokens like the real ones.
    processor = load_processor(str(build_tiny_llava(work / "tiny-llava")))
    if args.dry_run:
        config = tiny_config(processor.tokenizer, layers=args.layers or 1, heads=DRY_RUN_HEADS,
                             kv_heads=DRY_RUN_KV_HEADS)
        device, dtype = torch.device("cpu"), torch.float32
        layers = config.text_config.num_hidden_layers
        label = (f"dry run: tiny LLaVA, {layers} text layer{'s' if layers > 1 else ''}, "
                 f"{DRY_RUN_HEADS} query / {DRY_RUN_KV_HEADS} KV heads, random weights (cpu, float32)")
    else:
        config = llava_llama3_8b_config()
        if args.layers:
            config.text_config.num_hidden_layers = args.layers
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        label = f"LLaVA-LLaMA-3-8B shape, random weights ({device.type}, {str(dtype).removeprefix('torch.')})"
        if args.layers:
            label += f", {args.layers} text layers"
    config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = random_model(config, device, dtype)
    if args.load_in_4bit:
        from transformers import LlavaForConditionalGeneration

        # bitsandbytes quantizes on load: save once, reload with the engine's quantization settings.
        saved = work / "full"
        model.save_pretrained(saved)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = LlavaForConditionalGeneration.from_pretrained(
            saved, dtype=dtype, device_map={"": str(device)}, quantization_config=quantization_config(dtype),
            attn_implementation=attention.register()).eval()
        label += ", 4-bit NF4"
    return model, processor, label


def resolve_batch_sizes(args, model, processor, gen_kwargs: dict) -> dict[str, int]:
    """The batch sizes asked for; `auto` probed once, for the compiled path's static cache (the same
    KV memory as the eager path's full-grown cache), so both modes race at the same size. A probe that
    fails drops `auto` from the race, and says why."""
    sizes = {}
    for b in args.batch_sizes:
        if b != "auto":
            sizes[b] = int(b)
            continue
        try:
            sizes["auto"] = generation.auto_batch_size(model, processor, max(PROMPTS, key=len), gen_kwargs,
                                                       args.max_images, static_cache=True).size
        except Exception as e:  # noqa: BLE001 - the fixed sizes still run
            traceback.print_exc()
            print(f"batch size auto: the probe failed ({first_line(e)}); left out", flush=True)
    return sizes


def common_prefix(a: list[str], b: list[str]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def agreement_text(c: Config, ref: Config, tokens: int) -> tuple[str, float, bool]:
    """(how c's answers compare with ref's, share agreeing on the first `tokens` tokens, all identical)."""
    shared = [i for i in c.texts if i in ref.texts]
    if not shared:
        return "no images in common", 0.0, False
    pairs = [(c.texts[i].split(), ref.texts[i].split()) for i in shared]
    identical = sum(a == b for a, b in pairs)
    head = sum(a[:tokens] == b[:tokens] for a, b in pairs)
    prefix = statistics.mean(common_prefix(a, b) for a, b in pairs)
    length = statistics.mean(len(b) for _, b in pairs)
    text = f"{head}/{len(pairs)} · {identical}/{len(pairs)} · {prefix:.0f} of {length:.0f}"
    return text, head / len(pairs), identical == len(pairs)


def table(configs: list[Config], header: str, cuda: bool, tokens: int) -> str:
    naive = next((c for c in configs if c.contender == "naive" and c.rates), None)
    base = statistics.median(naive.rates) if naive else None
    lines = [header, "",
             "| configuration | images per run | runs | images/s min / median / max | vs naive | first runs s | "
             + ("peak GPU MiB" if cuda else "peak PSS MiB")
             + f" | answers: same first {tokens} tokens · identical · mean common prefix (tokens) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in configs:
        if not c.rates:
            why = f"failed: {c.error}" if c.error else "not run (time budget)"
            lines.append(f"| {c.name} | {len(c.items)} | 0 | {why} | | | | |")
            continue
        med = statistics.median(c.rates)
        same = c.agreement or c.reference or "-"
        if c.agreement and c.reference:
            same += f" (vs {c.reference})"
        if not c.stable:
            same += "; CHANGED between repeats"
        if c.recompiled:
            same += f"; RECOMPILED {c.recompiled}x inside timed runs"
        if c.error:
            same += f"; a later run failed: {c.error}"
        lines.append(f"| {c.name} | {len(c.items)} | {len(c.rates)} | {min(c.rates):.2f} / {med:.2f} / "
                     f"{max(c.rates):.2f} | " + (f"{med / base:.2f}x" if base else "-") + f" | {c.warmup_s:.1f} | "
                     f"{(c.gpu if cuda else c.pss) / 2**20:.0f} | {same} |")
    return "\n".join(lines)


def plan(args, sizes: dict[str, int], all_items: list[tuple[str, str]]) -> list[Config]:
    """The configurations in the order of the first round: compiled before eager (the compiled rows are the
    ones a short GPU lease must not lose), then the optional A/B rows with transformers' own attention."""
    modes = {"off": [False], "on": [True], "both": [True, False]}[args.compile]
    configs: list[Config] = []

    def add(b: int, shown: str, compiled: bool, attn: str) -> None:
        count = min(max(args.num_images, args.batches_per_config * b), len(all_items))
        suffix = (", compiled" if compiled else "") + (", transformers' SDPA attention" if attn == STOCK_SDPA
                                                       else "")
        for contender in ("generate", "engine"):
            if contender in args.contenders:
                name = f"{'generate only' if contender == 'generate' else 'engine'}, batch {shown}{suffix}"
                configs.append(Config(name, contender, b, compiled, all_items[:count], attention=attn))

    for compiled in modes:
        if "naive" in args.contenders and not compiled:
            configs.append(Config("naive loop (1 image at a time)", "naive", 1, False, all_items[:args.num_images]))
        for key, b in sizes.items():
            add(b, f"auto = {b}" if key == "auto" else str(b), compiled, attention.GROUPED_SDPA)
    if args.ab_batch_size:
        for compiled in modes:
            add(args.ab_batch_size, str(args.ab_batch_size), compiled, STOCK_SDPA)
    return configs


def throughput(args) -> int:
    """Run the race and print the table. 0: done and the answers agree; 1: some answers disagree or a
    configuration failed; 130: stopped (SIGTERM or Ctrl-C) with the table so far."""
    import torch
    import torch._dynamo
    import transformers

    start_time = time.perf_counter()

    def clock() -> str:
        return f"{time.perf_counter() - start_time:.0f} s"

    # A timeout's SIGTERM stops the race like Ctrl-C: the table so far is printed, not lost.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Each batch size (and attention) is one more graph of the same function; past torch's default limit
    # of 8 it would run uncompiled without failing, and a "compiled" row would time eager code.
    torch._dynamo.config.recompile_limit = 64
    work = Path(tempfile.mkdtemp(prefix="jj-vmed-bench-"))
    configs: list[Config] = []
    header = "(nothing measured yet)"
    cuda = False
    stopped = False
    try:
        torch.manual_seed(0)
        model, processor, label = load_bundle(args, work)
        device = input_device(model)
        cuda = device.type == "cuda"
        cores = os.cpu_count() or 1
        workers = args.num_workers if args.num_workers is not None else \
            (min(4, max(1, cores - 1)) if cuda else max(1, cores // 2))
        threads = args.threads or (torch.get_num_threads() if cuda else
                                   max(1, cores - workers) if "engine" in args.contenders else cores)
        torch.set_num_threads(threads)  # every contender; the engine's cpu_split sets the same on CPU
        gen_kwargs = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                      "do_sample": False, "num_beams": 1}
        sizes = resolve_batch_sizes(args, model, processor, gen_kwargs)
        needed = max([max(args.num_images, args.batches_per_config * b) for b in sizes.values()]
                     + [args.batches_per_config * args.ab_batch_size])
        folder = image_folder(Path(args.image_dir), min(needed, args.max_images), work / "images")
        all_items = list_images(folder)
        prompts = {i: PROMPTS[k % len(PROMPTS)] for k, (i, _) in enumerate(all_items)}
        configs = plan(args, sizes, all_items)
        backend = "eager" if args.dry_run else args.compile_backend
        header = (f"{label}; images cycled from {args.image_dir}, 3 prompts of different lengths; "
                  f"{args.max_new_tokens} new tokens per image; torch {torch.__version__}, transformers "
                  f"{transformers.__version__}, {cores} cores, torch threads {threads} for every "
                  f"contender" + (f", engine: {workers} decode workers" if "engine" in args.contenders else "")
                  + f"; compile backend {backend}; up to {args.repeats} interleaved repeats"
                  + (f"; {torch.cuda.get_device_name()}" if cuda else ""))
        print(header, flush=True)

        pool = {}
        if any(c.contender == "generate" for c in configs):
            t0 = time.perf_counter()
            pool = preprocess_once(processor, all_items, prompts, device, model.dtype)
            print(f"[{clock()}] preprocessed {len(all_items)} images once, untimed ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        tokenizer = TokenIds(processor.tokenizer)
        stop_ids = stop_token_ids(processor.tokenizer, model.generation_config)

        def use_attention(name: str) -> None:
            if model.config.text_config._attn_implementation != name:
                model.set_attn_implementation(name)

        def run(c: Config, items: list[tuple[str, str]], batches: list[Batch]) -> tuple[dict[str, str], float]:
            """One run of `c` over `items` (generate only: over `batches`), timed."""
            use_attention(c.attention)
            sync(device)
            t0 = time.perf_counter()
            texts = CONTENDERS[c.contender](model, processor, items, prompts, gen_kwargs, batch_size=c.batch_size,
                                            workers=workers, batches=batches, generator=c.generator)
            sync(device)
            return texts, time.perf_counter() - t0

        def set_up(c: Config) -> None:
            """Its generator (for --compile: one cache, one compile, kept) and one untimed run per prompt length."""
            if c.compiled:
                c.generator = generation.StaticGenerator(model, tokenizer, gen_kwargs, stop_ids, c.batch_size, backend)
            else:
                def eager(inputs: dict) -> list[str]:
                    return generation.generate_texts(model, tokenizer, inputs, device, gen_kwargs, stop_ids)
                c.generator = eager
            if c.contender == "generate":
                c.batches = [Batch([i for i, _ in c.items[s:s + c.batch_size]],
                                   {k: v[s:min(s + c.batch_size, len(c.items))] for k, v in pool.items()}, [])
                             for s in range(0, len(c.items), c.batch_size)]  # c.items are the pool's first rows
                firsts = {b.inputs["input_ids"].shape[1]: b for b in c.batches}.values()  # a batch per prompt length
                for b in firsts:
                    c.warmup_s += run(c, b.ids, [b])[1]
            else:
                c.warmup_s = run(c, c.items[:c.batch_size], [])[1]
            print(f"[{clock()}] ready: {c.name} (first runs {c.warmup_s:.1f} s)", flush=True)

        def expected_s(c: Config) -> float:
            if c.seconds:
                return c.seconds[-1]
            return max([d.warmup_s + d.seconds[0] for d in configs if d.seconds and d.compiled == c.compiled] or [0])

        for r in range(args.repeats):
            ready = [c for c in configs if c.rates]
            order = configs if r == 0 else ready[r % len(ready):] + ready[:r % len(ready)]
            for c in order:
                if c.error:
                    continue
                if args.budget_s and time.perf_counter() - start_time + expected_s(c) > args.budget_s:
                    continue
                gpu_peak_reset(device)
                try:
                    if r == 0:
                        set_up(c)
                    graphs = compiled_graphs()
                    # On a GPU the sampler's reads of /proc would compete with the host-bound eager steps.
                    with contextlib.nullcontext() if cuda else PeakMemory() as mem:
                        texts, seconds = run(c, c.items, c.batches)
                    c.recompiled += compiled_graphs() - graphs
                except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others' numbers
                    traceback.print_exc()
                    c.error, c.generator = first_line(e), None
                    print(f"[{clock()}] {c.name}: failed: {c.error}", flush=True)
                    continue
                c.seconds.append(seconds)
                c.rates.append(len(c.items) / seconds)
                c.pss, c.gpu = max(c.pss, mem.peak if mem else 0), max(c.gpu, gpu_peak(device))
                c.stable = c.stable and (not c.texts or texts == c.texts)
                c.texts = c.texts or texts
                print(f"[{clock()}] {c.name}: {c.rates[-1]:.2f} images/s", flush=True)
                check_answers(configs, cuda, args.agreement, args.agreement_tokens)
                write_table(args, table(configs, header, cuda, args.agreement_tokens))
    except KeyboardInterrupt:
        stopped = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = check_answers(configs, cuda, args.agreement, args.agreement_tokens)
    text = table(configs, header, cuda, args.agreement_tokens)
    if stopped:
        text += f"\nSTOPPED after {time.perf_counter() - start_time:.0f} s (SIGTERM or Ctrl-C): the table so far"
    elif not ok:
        text += "\nWARNING: some configuration failed or did not reproduce its reference's answers"
    write_table(args, text)
    print("\n" + text, flush=True)
    return 130 if stopped else 0 if ok else 1


def check_answers(configs: list[Config], cuda: bool, agreement: float, tokens: int) -> bool:
    """Compare every configuration's answers with its reference's (see the module docstring) and note the
    result in the row. On CPU all must be identical; on a GPU `agreement` of them must share the first
    `tokens` tokens. A configuration answering differently between its own repeats fails on CPU."""
    done = [c for c in configs if c.texts]
    if not done:
        return False
    ok = not any(c.error for c in configs)
    eager = [c for c in done if not c.compiled and c.attention == attention.GROUPED_SDPA and c.contender != "naive"]
    first = eager[0] if eager else done[0]
    for c in done:
        ref = next((e for e in eager if e.batch_size == c.batch_size and e.contender == c.contender), first)
        if ref is c:
            ref = first
        if ref is c:
            c.reference, c.agreement = "reference", ""
            continue
        c.agreement, share, identical = agreement_text(c, ref, tokens)
        c.reference = ref.name.removeprefix("generate only, ").removeprefix("engine, ")
        if not (share >= agreement if cuda else identical):
            ok = False
    return ok and (cuda or all(c.stable for c in done))


def write_table(args, text: str) -> None:
    if args.table:
        from jjvmed.files import write_text_atomic

        write_text_atomic(args.table, text + "\n")


# ---------------------------------------------------------------------------------------------
# Memory and resume, through the engine's own generation source (what pipeline.run calls)
# ---------------------------------------------------------------------------------------------


def memory_child(count: int, work: str) -> None:
    """One engine run over `count` small images in a fresh process; prints its peak memory (JSON)."""
    folder = build_tiny_llava(Path(work) / f"tiny-{count}")
    bundle = load_model(ModelSpec(str(folder), None, device="cpu"))
    out = Path(work) / f"mem-{count}.csv"
    plan = Generation(task="caption", model=ModelSpec(str(folder), None, device="cpu"),
                      prompt=prompts.build_prompt("vicuna", "x"),
                      gen_kwargs={"max_new_tokens": 2, "min_new_tokens": 2, "do_sample": False},
                      batch_size=16, num_workers=2)
    cfg = RunConfig(task="caption", output_csv=str(out), image_dir=str(Path(work) / "small"), limit=count,
                    overwrite=True)
    source = GenerateSource(plan, bundle)
    with PeakMemory(every=0.005) as mem:
        result = source.produce(cfg, select(cfg, source))
    assert result.done_now == count
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
        plan = Generation(task="caption", model=spec, prompt=prompts.build_prompt("vicuna", "x"),
                          gen_kwargs={"max_new_tokens": 1, "min_new_tokens": 1, "do_sample": False},
                          batch_size=1, num_workers=0)
        cfg = RunConfig(task="caption", output_csv=str(out), image_dir=str(images), resume="auto")
        with open(cfg.journal_path, "wb") as fh:
            fh.write(header_line(plan.settings("float32"), os.path.abspath(images)))
            for i in range(1, 20_001):
                name = f"img_{i:05d}"
                fh.write(record_line(Record(name, "a previous caption " * 5), file_identity(images / f"{name}.png")))
        first_batch = {}
        original = generation.generate_batches

        def timed(*a, **k):
            for records in original(*a, **k):
                first_batch.setdefault("t", time.perf_counter())
                yield records

        generation.generate_batches = timed  # the source imports it when it starts generating
        start = time.perf_counter()
        source = GenerateSource(plan, bundle)
        result = source.produce(cfg, select(cfg, source))
        generation.generate_batches = original
        assert result.done_now == 1 and len(result.ids) == 20_001
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
                        help="eager generation, compiled (static cache + torch.compile), or both (compiled first)")
    parser.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--ab_batch_size", type=int, default=0,
                        help="also rows at this batch size with transformers' own SDPA attention (the A/B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=None, help="default: the engine's own choice")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every contender (default: on CPU the cores the engine's decode "
                        "workers leave, as the engine does, or all of them without the engine; on a GPU torch's "
                        "default)")
    parser.add_argument("--agreement", type=float, default=0.9,
                        help="on a GPU, the share of answers that must agree with the reference on their first "
                        "--agreement_tokens tokens")
    parser.add_argument("--agreement_tokens", type=int, default=4)
    parser.add_argument("--budget_s", type=float, default=0,
                        help="start no run that would end past this many seconds from the start (0: no limit)")
    parser.add_argument("--table", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--full_size", action="store_true", help="8B-shaped model with random weights (GPU)")
    parser.add_argument("--dry_run", action="store_true",
                        help="--full_size's build on CPU at a tiny size (1 layer, 8 query / 2 KV heads), "
                        "compile backend eager: what gpu.sh --dry-run runs")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --full_size or --dry_run: this many text layers")
    parser.add_argument("--load_in_4bit", action="store_true", help="with --full_size: NF4 4-bit (needs bitsandbytes)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory at 200 vs 2000 images")
    parser.add_argument("--resume", action="store_true", help="also time a resume from a 20,000-record journal")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--_memory_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        memory_child(int(args._memory_child[0]), args._memory_child[1])
        return 0
    status = 0
    if not args.skip_throughput:
        status = throughput(args)
        if status == 130:
            return status
    if args.memory:
        memory(args)
    if args.resume:
        resume(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
