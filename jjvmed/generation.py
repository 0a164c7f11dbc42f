"""The one generation core: batches of preprocessed images in, one `Record` per image out, with the
out-of-memory back-off. Both generate scripts, fine-tuning's validation and the benchmark use it.

generate() runs one of two ways, with the same greedy text:
- eager (the default): Hugging Face `generate` as it comes, a dynamic KV cache;
- compiled (`--compile`, `compile_backend="inductor"`): a static KV cache and a torch.compile'd decoding
  step (transformers compiles the step itself when generate() gets a static cache and a compile_config;
  the prefill stays eager). On a GPU this removes most of the host time per decoding step, which
  otherwise caps throughput whatever the batch size.
Both decode with the attention the model is loaded with (model.py: attention.py's grouped attention,
which reads the KV cache once per step instead of repeating it for every query head).

`auto_batch_size` picks the largest batch that fits the GPU (`--batch_size auto`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .errors import first_line, log
from .images import Batch
from .model import input_device, stop_token_ids
from .records import Record

# --batch_size auto on CPU. A decoding step reads every weight whatever the batch (33 GB for the 8B
# model in float32), so larger batches cost less per image; in the CPU race (README, Throughput) batch
# 16 beat 8 by a median 1.6x, for ~0.2 GB more per image of the 8B's cache and activations.
CPU_BATCH_SIZE = 16
# --batch_size auto on CUDA: probe up to this many images per batch, then keep this share of the free
# memory. Past ~256 the 8B model's prefill dominates and a bigger batch gains little (README, Throughput).
AUTO_BATCH_CAP = 256
AUTO_BATCH_START = 8  # the first probe; 1, 2 and 4 would cost ~10 s on the 8B model and tell little more
AUTO_BATCH_MARGIN = 0.8
STATIC_CACHE_STEP = 64  # static cache lengths are rounded up to this, so a few tokens more reuse the cache


Answer = str | tuple[str, ...]  # one image's text, or its candidates, best first (num_return_sequences > 1)


def generate_batches(model, processor, batches: Iterable[Batch], gen_kwargs: dict,
                     compile_backend: str | None = None, batch_size: int | None = None,
                     generator: Callable[[dict], list[Answer]] | None = None) -> Iterator[list[Record]]:
    """One list of records per batch, in the batch's order: images that failed to load first.

    With `num_return_sequences` N > 1 in `gen_kwargs` (best of N) each record keeps the N candidates, and
    its text is the first: the best beam with beam search, the first sample with sampling.

    `compile_backend` (a torch.compile backend, "inductor" for --compile) selects the compiled path;
    it needs `batch_size`, the largest batch the loader gives, to fix the shapes it compiles for.
    `generator`: a StaticGenerator kept by the caller across calls (the benchmark reuses one per
    configuration, so its cache and compiled step are made once).
    """
    tokenizer = processor.tokenizer
    device = input_device(model)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    generate: Callable[[dict], list[Answer]]
    if generator is not None:
        generate = generator
    elif compile_backend:
        if not batch_size:
            raise ValueError("compiled generation needs the batch size it pads to")
        generate = StaticGenerator(model, tokenizer, gen_kwargs, stop_ids, batch_size, compile_backend)
    else:
        def generate(inputs: dict) -> list[Answer]:
            return generate_texts(model, tokenizer, inputs, device, gen_kwargs, stop_ids)

    for batch in batches:
        records = [Record(i, "", error) for i, error in batch.failures]
        if batch.inputs is not None:
            outs = generate_with_backoff(generate, batch.inputs, len(batch.ids))
            records += [Record(i, "", f"generation failed: {first_line(out)}") if isinstance(out, Exception)
                        else answer_record(i, out) for i, out in zip(batch.ids, outs, strict=True)]
        yield records


def answer_record(image_id: str, answer: Answer) -> Record:
    if isinstance(answer, tuple):
        return Record(image_id, answer[0], candidates=answer)
    return Record(image_id, answer)


def per_image(texts: list[str], images: int) -> list[Answer]:
    """The decoded sequences of a batch, one answer per image: its text, or with several sequences per image
    its candidates (generate() returns them grouped by input, best beam first)."""
    per = len(texts) // images
    if per == 1:
        return texts
    return [tuple(texts[n * per:(n + 1) * per]) for n in range(images)]


def move_inputs(inputs: dict, device, dtype) -> dict:
    """Inputs on the model's device (asynchronous from pinned memory), pixels in the model's dtype."""
    moved = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return moved


def generate_texts(model, tokenizer, inputs: dict, device, gen_kwargs: dict, stop_ids: list[int]) -> list[Answer]:
    """Generate for one preprocessed batch and decode only the new tokens, one answer per image."""
    import torch

    moved = move_inputs(inputs, device, model.dtype)
    with torch.inference_mode():
        out = model.generate(**moved, **gen_kwargs, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[:, moved["input_ids"].shape[1]:]
    return per_image(tokenizer.batch_decode(new_tokens, skip_special_tokens=True), len(moved["input_ids"]))


def slice_inputs(inputs: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in inputs.items()}


def generate_with_backoff(generate: Callable[[dict], list[Answer]], inputs: dict, n: int
                          ) -> list[Answer | Exception]:
    """Run `generate`; on CUDA out-of-memory halve the batch and retry the same images, down to 1.

    An image that fails even alone gets its exception in place of its text; nothing is skipped.
    """
    import torch

    try:
        return list(generate(inputs))
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        if n == 1:
            return [e]
    half = (n + 1) // 2
    log(f"CUDA out of memory at batch size {n}; retrying as {half} + {n - half}")
    return (generate_with_backoff(generate, slice_inputs(inputs, 0, half), half)
            + generate_with_backoff(generate, slice_inputs(inputs, half, n), n - half))


# ---------------------------------------------------------------------------------------------
# Static shapes: the compiled path
# ---------------------------------------------------------------------------------------------


def padded_sizes(batch_size: int) -> list[int]:
    """The batch sizes the compiled step is ever run at: the configured size and the powers of two below it.

    Every batch, the last, smaller one too, is padded to `batch_size`; after an out-of-memory, to the next
    power of two below. So a run compiles once, and at most log2(batch_size) + 1 times however memory goes.
    """
    sizes = {batch_size}
    power = 1
    while power < batch_size:
        sizes.add(power)
        power *= 2
    return sorted(sizes)


def pad_rows(tensor, rows: int):
    """`tensor` with copies of its first row appended up to `rows` rows (their outputs are dropped)."""
    import torch

    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(missing, *tensor.shape[1:])])


def cache_argument(model) -> str:
    """generate()'s name for a Cache object: `cache` in newer transformers 5 releases, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a PEFT wrapper
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def compile_config(backend: str, device_type: str):
    from transformers import CompileConfig

    # CUDA graphs ("reduce-overhead") replay a whole decoding step with one launch: the host time per
    # step is what makes eager generate slow on a GPU. Shapes are fixed by padding, so dynamic=False.
    mode = "reduce-overhead" if backend == "inductor" and device_type == "cuda" else "default"
    config = CompileConfig(fullgraph=False, dynamic=False, backend=backend, mode=mode)
    if device_type != "cuda":
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told to
    return config


class StaticGenerator:
    """generate() with a static KV cache and, given a backend, a compiled decoding step.

    A compiled step is specialised to its shapes (and, with CUDA graphs, to its buffers' addresses), so:
    - every batch is padded, with copies of its first row whose outputs are dropped, to the largest size
      still allowed (`batch_size` until an out-of-memory lowers it): a short last batch costs some wasted
      rows, a second compile would cost about a minute on the 8B model;
    - one cache is kept and reset between batches instead of a new one per call, and is only replaced
      when the batch size changes or a prompt needs more room;
    - after an out-of-memory the largest size is lowered for the rest of the run: going back up would
      run out of memory again, and recompile each time.
    Without a backend (the batch-size probe) it is the same static cache, uncompiled.
    """

    def __init__(self, model, tokenizer, gen_kwargs: dict, stop_ids: list[int], batch_size: int,
                 compile_backend: str | None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = input_device(model)
        self.stop_ids = stop_ids
        self.sizes = padded_sizes(batch_size)
        self.limit = batch_size  # the largest batch generate() is run at
        self.max_new_tokens = gen_kwargs.get("max_new_tokens") or model.generation_config.max_new_tokens or 20
        self.cache_arg = cache_argument(model)
        compiled = {"compile_config": compile_config(compile_backend, self.device.type)} if compile_backend \
            else {"disable_compile": True}  # transformers would compile a static cache on CUDA by itself
        self.gen_kwargs = {**gen_kwargs, **compiled}
        self.cache = None
        self.cache_rows = 0
        self.cache_len = 0

    def __call__(self, inputs: dict) -> list[Answer]:
        import torch

        n = len(inputs["input_ids"])
        if n > self.limit:
            texts: list[Answer] = []
            for start in range(0, n, self.limit):
                texts += self(slice_inputs(inputs, start, start + self.limit))
            return texts
        rows = self.limit  # a short batch (the last of a run) is padded: one compiled size, not a second compile
        try:
            return self.generate(inputs, n, rows)
        except torch.cuda.OutOfMemoryError:
            self.cache = None  # free it before the halves run
            self.limit = max([s for s in self.sizes if s < rows] or [1])
            raise

    def cache_for(self, rows: int, length: int):
        """The kept cache if it fits `rows` x `length`, else a new one (the old one freed first)."""
        from transformers import StaticCache

        if self.cache is not None and self.cache_rows == rows and self.cache_len >= length:
            return self.cache
        self.cache = None
        self.cache_rows = rows
        self.cache_len = max(self.cache_len, -(-length // STATIC_CACHE_STEP) * STATIC_CACHE_STEP)
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.cache_len)
        return self.cache

    def generate(self, inputs: dict, n: int, rows: int) -> list[Answer]:
        import torch

        moved = move_inputs(inputs, self.device, self.model.dtype)
        padded = {k: pad_rows(v, rows) for k, v in moved.items()}
        prompt_len = padded["input_ids"].shape[1]
        cache = self.cache_for(rows, prompt_len + self.max_new_tokens)
        # no_grad rather than inference_mode: the cache's tensors outlive this call (they are reset in place
        # and are the compiled step's fixed buffers), and inference-mode tensors may not be changed outside it.
        with torch.no_grad():
            cache.reset()
            out = self.model.generate(**padded, **self.gen_kwargs, **{self.cache_arg: cache},
                                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
        per = out.shape[0] // rows  # sequences per image (best of N), grouped by input row
        return per_image(self.tokenizer.batch_decode(out[:n * per, prompt_len:], skip_special_tokens=True), n)


# ---------------------------------------------------------------------------------------------
# --batch_size auto
# ---------------------------------------------------------------------------------------------


def parse_batch_size(text: str) -> int | None:
    """--batch_size: a number, or `auto` (None)."""
    import argparse

    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


@dataclass(frozen=True)
class AutoBatch:
    size: int
    how: str  # how it was chosen, for the log and the run summary


def auto_batch_size(model, processor, prompt: str, gen_kwargs: dict, images: int, static_cache: bool,
                    cap: int = AUTO_BATCH_CAP, margin: float = AUTO_BATCH_MARGIN) -> AutoBatch:
    """The largest batch that fits: on CUDA measured, on CPU `CPU_BATCH_SIZE`. Never more than `images`.

    On CUDA, real generate() calls on a dummy image with the run's prompt and answer length (forced to
    the full `max_new_tokens`) at batch 8, 16, 32, ... (4, 2, 1 if 8 does not fit) measure the peak
    memory; a line through the last two points gives the memory per image, and the batch keeps `margin`
    of the free memory. Doubling stops at `cap`, at an out-of-memory, or as soon as the line says the
    next size would not fit. On the 8B model this takes about half a minute.
    `static_cache`: probe the compiled path's memory (its static cache, uncompiled: compiling every
    probed size would take minutes).
    """
    import torch

    images = max(1, images)
    device = input_device(model)
    if device.type != "cuda":
        return AutoBatch(min(CPU_BATCH_SIZE, images), f"auto: {CPU_BATCH_SIZE} on CPU")
    log("batch size auto: measuring the memory of a few batches (generating on a dummy image)")
    cap = max(1, min(cap, images))
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    tokenizer = processor.tokenizer
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    forced = {**gen_kwargs, "min_new_tokens": gen_kwargs.get("max_new_tokens", 1)}
    one = dict(processor(text=[prompt], images=[dummy_image()], return_tensors="pt", padding=True))

    def run(size: int) -> None:
        inputs = {k: v.repeat(size, *[1] * (v.dim() - 1)) for k, v in one.items()}
        if static_cache:
            StaticGenerator(model, tokenizer, forced, stop_ids, size, None)(inputs)
        else:
            generate_texts(model, tokenizer, inputs, device, forced, stop_ids)

    torch.cuda.empty_cache()
    base = {d: torch.cuda.memory_allocated(d) for d in devices}
    headroom = {d: torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - base[d] for d in devices}
    peaks: list[tuple[int, dict[int, int]]] = []
    failed_at = None
    size = min(AUTO_BATCH_START, cap)
    while True:
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
        try:
            run(size)
        except torch.cuda.OutOfMemoryError:
            failed_at = size
            torch.cuda.empty_cache()
            if peaks or size == 1:
                break
            size //= 2  # not even the first size fits: go down before going up
            continue
        peaks.append((size, {d: torch.cuda.max_memory_allocated(d) - base[d] for d in devices}))
        torch.cuda.empty_cache()
        if size >= cap or fit_batch(peaks, headroom, margin) < 2 * size:
            break
        size = min(2 * size, cap)
    if not peaks:
        return AutoBatch(1, "batch size auto: 1 (out of memory even at batch 1)")
    best = min(fit_batch(peaks, headroom, margin), cap, failed_at - 1 if failed_at else cap)
    if best >= 16:
        best -= best % 8  # matrix shapes in multiples of 8 suit the tensor cores
    best = max(1, best)
    per_image = max(line_through(peaks, d)[0] for d in devices)
    how = (f"batch size auto: {best} (probed up to {peaks[-1][0]}"
           + (f", out of memory at {failed_at}" if failed_at else "")
           + f"; {per_image / 2**30:.2f} GiB per image, {min(headroom.values()) / 2**30:.1f} GiB free, "
           f"{margin:.0%} of it used)")
    log(how)
    return AutoBatch(best, how)


def line_through(peaks: list[tuple[int, dict[int, int]]], device: int) -> tuple[float, float]:
    """(bytes per image, fixed bytes) on device `device`, from the last two probes. With one probe the
    whole peak counts as per-image, which is cautious."""
    s2, p2 = peaks[-1]
    s1, p1 = peaks[-2] if len(peaks) > 1 else (0, {device: 0})
    per = (p2[device] - p1[device]) / (s2 - s1)
    return per, p2[device] - s2 * per


def fit_batch(peaks: list[tuple[int, dict[int, int]]], headroom: dict[int, int], margin: float) -> int:
    """The largest batch whose peak memory, on the line through the probes, stays within `margin` of
    every device's headroom."""
    fits = []
    for device, room in headroom.items():
        per, fixed = line_through(peaks, device)
        fits.append(int((margin * room - fixed) // per) if per > 0 else AUTO_BATCH_CAP)
    return max(0, min(fits))


def dummy_image():
    from PIL import Image

    return Image.new("RGB", (336, 336), (128, 128, 128))
