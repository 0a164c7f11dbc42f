"""CUDA out-of-memory: the batch is halved and the same images retried, down to 1; none skipped.

There is no GPU here, so the error is raised by a stand-in for generate() that "runs out of
memory" above a batch size; the halving logic under test is the engine's own.
"""

from __future__ import annotations

import torch

from generation import generate_with_backoff


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
