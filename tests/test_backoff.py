"""CUDA out-of-memory: the batch is halved and the same images retried, down to 1; none skipped.

There is no GPU here, so the error is raised by a stand-in for generate() that "runs out of
memory" above a batch size; the halving logic under test is the engine's own (and, for --compile,
the compiled path's own padding and size limit).
"""

from __future__ import annotations

import torch

from jjvmed.generation import StaticGenerator, generate_with_backoff, padded_sizes
from jjvmed.model import ModelSpec, load_model


def fake_generate(limit: int, calls: list[int]):
    def generate(inputs: dict) -> list[str]:
        n = len(inputs["input_ids"])
        calls.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"caption {int(i)}" for i in inputs["input_ids"][:, 0]]
    return generate


def batch(n: int) -> dict:
    return {"input_ids": torch.arange(n).unsqueeze(1), "pixel_values": torch.zeros(n, 3, 2, 2)}


def test_out_of_memory_halves_the_batch_and_keeps_every_image_in_order():
    calls: list[int] = []
    out = generate_with_backoff(fake_generate(2, calls), batch(7), 7)
    assert out == [f"caption {i}" for i in range(7)]
    assert calls[0] == 7 and max(c for c in calls[1:]) <= 4 and sum(c for c in calls if c <= 2) == 7


def test_an_image_too_big_even_alone_becomes_an_error_not_a_crash():
    out = generate_with_backoff(fake_generate(0, []), batch(3), 3)
    assert len(out) == 3 and all(isinstance(o, torch.cuda.OutOfMemoryError) for o in out)


class OutOfMemoryAbove(StaticGenerator):
    """The compiled path with generate() replaced by a stand-in that runs out of memory above `fits` rows."""

    def __init__(self, *args, fits: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fits = fits
        self.tried: list[int] = []

    def generate(self, inputs: dict, n: int, rows: int) -> list[str]:
        self.tried.append(rows)
        if rows > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"caption {int(i)}" for i in inputs["input_ids"][:n, 0]]


def test_compiled_path_never_retries_a_size_that_ran_out_of_memory(tiny_model):
    model, processor, _ = load_model(ModelSpec(str(tiny_model), None, device="cpu"))
    generate = OutOfMemoryAbove(model, processor.tokenizer, {"max_new_tokens": 2}, [], 6, "eager", fits=4)
    first = generate_with_backoff(generate, batch(6), 6)
    second = generate_with_backoff(generate, batch(5), 5)  # the last, smaller batch of a run
    assert first == [f"caption {i}" for i in range(6)] and second == first[:5]
    # 6 failed once; after that every batch runs at 4 or less, and always at a size in the compiled set.
    assert generate.tried[0] == 6 and max(generate.tried[1:]) == 4
    assert set(generate.tried) <= set(padded_sizes(6))
