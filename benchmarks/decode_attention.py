"""One decoding step with the grouped attention (jjvmed/attention.py) vs K/V repeated for every query head,
on a stand-in with the 8B's attention shapes; and the memory traffic of a step on an H200, by arithmetic.

    python benchmarks/decode_attention.py                    # CPU: batch 8 and 32, 32 layers, float32
    python benchmarks/decode_attention.py --device cuda      # the same on a GPU, bf16

The stand-in is Llama-3-8B's text model where attention is concerned: 32 layers, 32 query heads sharing
8 KV heads of 128 dimensions, a static KV cache of 768 slots (a ~610-token prompt plus 100 new tokens,
rounded up to 64 as the compiled path does) of which the first 640 are filled (random keys and values:
attention costs the same whatever they hold). Shrunk so it fits in memory: hidden size 256 instead of 4096
(the projections into and out of the heads are narrower), MLP 512 instead of 14336, vocabulary 1024 instead
of 128320. The attention's own work (reading the cache, and with the repeat copying it) is full size.

Contenders, interleaved and repeated with the same torch threads, each timed as the median of a few
steps at the same cache position (the cache length is put back after each step):
- grouped: the tool's attention; the 4 query heads of a group attend to their KV head, nothing copied;
- repeated: K/V repeated 4x before SDPA, as transformers' SDPA attention does whenever there is a mask
  (every decoding step on 5.17, and under torch.compile on 5.24);
- transformers' SDPA as installed (5.24 groups the queries itself in eager decoding, 5.17 repeats).
The outputs of all three are checked to agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from jjvmed import attention, generation  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128  # Llama-3-8B's attention
HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128320  # the 8B's; the CPU stand-in shrinks these (see --hidden)
CACHE_SLOTS, FILLED = 768, 640
REPEATED = "repeated_kv_sdpa"
BF16 = 2  # bytes
H200_BYTES_PER_S = 4.8e12  # HBM3e peak
NEW_TOKENS = 100  # a caption's decoding steps, for the decode-only ceiling


def repeated_kv_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention as transformers' SDPA path runs a decoding step with a mask: K/V repeated to every head."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups),
                                                           attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def build(args):
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(REPEATED, repeated_kv_sdpa)
    AttentionMaskInterface.register(REPEATED, sdpa_mask)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         head_dim=HEAD_DIM, max_position_embeddings=8192, rope_theta=500000.0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attention.register())
    return model.eval()


def filled_cache(model, batch: int):
    """A static cache of CACHE_SLOTS slots with the first FILLED written (random), as after a prefill."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=CACHE_SLOTS)
    shape = (batch, KV_HEADS, FILLED, HEAD_DIM)
    with torch.no_grad():
        for layer in range(LAYERS):
            cache.update(torch.randn(shape, dtype=model.dtype, device=model.device),
                         torch.randn(shape, dtype=model.dtype, device=model.device), layer)
    return cache


def step(model, cache, inputs: dict):
    """One decoding step at position FILLED; the cache's length is put back, so every step is the same."""
    import torch

    with torch.no_grad():
        logits = model(**inputs, **{generation.cache_argument(model): cache}).logits
    for layer in cache.layers:
        layer.cumulative_length.fill_(FILLED)
    return logits


def step_ms(model, cache, inputs: dict, steps: int) -> float:
    import torch

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, cache, inputs)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args)
    contenders = {"grouped (the tool's)": attention.GROUPED_SDPA, "K/V repeated 4x": REPEATED,
                  "transformers' SDPA as installed": "sdpa"}
    import transformers

    print(f"\n{LAYERS} layers, {HEADS} query / {KV_HEADS} KV heads x {HEAD_DIM}, hidden {args.hidden}, MLP "
          f"{args.intermediate}, vocabulary {args.vocab}; static cache {CACHE_SLOTS} slots, {FILLED} filled; "
          f"{model.dtype}, {args.device}, torch threads {args.threads}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; median of {args.steps} steps per run, {args.repeats} interleaved runs")
    print("| batch | attention | ms per decoding step, min / median / max | vs grouped (median) |")
    print("|---:|---|---:|---:|")
    for batch in args.batch_sizes:
        cache = filled_cache(model, batch)
        mask = torch.ones(batch, FILLED + 1, dtype=torch.long, device=model.device)
        mask[0, :FILLED // 2] = 0  # a left-padded row, as in a batch of prompts of different lengths
        inputs = {"input_ids": torch.randint(0, args.vocab, (batch, 1), device=model.device), "attention_mask": mask,
                  "position_ids": torch.full((batch, 1), FILLED, device=model.device)}
        outputs = {}
        for name, impl in contenders.items():
            model.set_attn_implementation(impl)
            outputs[name] = step(model, cache, inputs)
        first = next(iter(outputs.values()))
        agree = all(torch.allclose(o, first, rtol=1e-3, atol=1e-3) for o in outputs.values())
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.repeats):  # interleaved, each round starting one contender further on
            for name in names[r % len(names):] + names[:r % len(names)]:
                model.set_attn_implementation(contenders[name])
                times[name].append(step_ms(model, cache, inputs, args.steps))
        base = statistics.median(times[names[0]])
        for name, ms in times.items():
            print(f"| {batch} | {name} | {min(ms):.0f} / {statistics.median(ms):.0f} / {max(ms):.0f} | "
                  f"{statistics.median(ms) / base:.2f}x |")
        print(f"(batch {batch}: outputs of the three agree: {'yes' if agree else 'NO'})")
        del cache


def traffic() -> None:
    """Bytes a decoding step reads and writes on the 8B in bf16, with and without the repeat."""
    layer = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2 + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    weights = (LAYERS * layer + VOCAB * HIDDEN + HIDDEN) * BF16  # the embedding table is only indexed
    slot = 2 * LAYERS * KV_HEADS * HEAD_DIM * BF16  # K and V of one cache slot of one sequence, all layers
    groups = HEADS // KV_HEADS
    # repeat_kv reads K/V once and writes them `groups` times; SDPA then reads the copies.
    repeated = slot + 2 * groups * slot
    print(f"\nH200 arithmetic (not measured): Llama-3-8B text model in bf16, {weights / 1e9:.1f} GB of weights read "
          f"per step; static cache of {CACHE_SLOTS} slots, all read every step; {slot // 1024} KiB per slot per "
          f"sequence, {repeated // 1024} KiB moved with the repeat; {H200_BYTES_PER_S / 1e12:.1f} TB/s peak")
    print("| batch | attention | KV cache traffic GB per step | total GB per step | step at peak bandwidth ms "
          f"| decode-only images/s ({NEW_TOKENS} tokens) |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in (32, 128):
        for name, per_slot in (("grouped", slot), ("K/V repeated 4x", repeated)):
            kv = batch * CACHE_SLOTS * per_slot
            seconds = (weights + kv) / H200_BYTES_PER_S
            print(f"| {batch} | {name} | {kv / 1e9:.1f} | {(weights + kv) / 1e9:.1f} | {seconds * 1000:.1f} | "
                  f"{batch / (NEW_TOKENS * seconds):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (the 8B: 4096)")
    parser.add_argument("--intermediate", type=int, default=512, help="MLP size (the 8B: 14336)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary (the 8B: 128320)")
    parser.add_argument("--steps", type=int, default=3, help="decoding steps per run (their median is the run's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the same for all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--traffic_only", action="store_true", help="only the H200 arithmetic")
    args = parser.parse_args()
    if not args.traffic_only:
        measure(args)
    traffic()


if __name__ == "__main__":
    main()
