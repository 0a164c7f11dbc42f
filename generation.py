"""The one generation core: batches of preprocessed images in, one `Record` per image out, with the
out-of-memory back-off. Both generate scripts, fine-tuning's validation and the benchmark use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from errors import first_line, log
from images import Batch
from model import input_device, stop_token_ids


@dataclass(frozen=True)
class Record:
    """What the run keeps for one image: the raw generated text, or why there is none."""

    id: str
    text: str = ""
    error: str | None = None  # None: generated

    @property
    def ok(self) -> bool:
        return self.error is None


def generate_batches(model, processor, batches: Iterable[Batch], gen_kwargs: dict) -> Iterator[list[Record]]:
    """One list of records per batch, in the batch's order: images that failed to load first."""
    tokenizer = processor.tokenizer
    device = input_device(model)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)

    def generate(inputs: dict) -> list[str]:
        return generate_texts(model, tokenizer, inputs, device, gen_kwargs, stop_ids)

    for batch in batches:
        records = [Record(i, "", error) for i, error in batch.failures]
        if batch.inputs is not None:
            outs = generate_with_backoff(generate, batch.inputs, len(batch.ids))
            records += [Record(i, "", f"generation failed: {first_line(out)}") if isinstance(out, Exception)
                        else Record(i, out) for i, out in zip(batch.ids, outs, strict=True)]
        yield records


def generate_texts(model, tokenizer, inputs: dict, device, gen_kwargs: dict, stop_ids: list[int]) -> list[str]:
    """Generate for one preprocessed batch and decode only the new tokens."""
    import torch

    moved = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**moved, **gen_kwargs, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[:, moved["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def slice_inputs(inputs: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in inputs.items()}


def generate_with_backoff(generate: Callable[[dict], list[str]], inputs: dict, n: int) -> list[str | Exception]:
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
