"""Decoding step time with the LoRA adapter applied by PEFT (unmerged) vs merged into the weights.

    python benchmarks/adapter_merge.py              # CPU stand-in with the 8B's layer structure
    python benchmarks/adapter_merge.py --device cuda --hidden 4096 --intermediate 14336 --heads 32 --kv_heads 8

The stand-in has the 8B language model's structure where it matters for this question: 32 decoder
layers, each with the 7 adapted projections (q/k/v/o/gate/up/down: 224 LoRA layers, r=16, the published
recipe), narrow by default so that, as on a GPU, the per-operation cost shows rather than arithmetic.
Both models generate the same prompts to the same forced length, interleaved and repeated; a run's
decoding step time is the median time between consecutive steps (prefill excluded). It also counts the
torch operations per decoding step (on a GPU each is at least one kernel launch) and checks that both
give the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tiny model fixture lives with the tests

from tiny_llava import tiny_config, train_tokenizer  # noqa: E402

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def build(args):
    """(unmerged PEFT model, merged model) with the same random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from jjvmed import attention

    config = tiny_config(train_tokenizer(), hidden=64, layers=1)  # a small vision side: only decoding is timed
    text = config.text_config
    text.hidden_size, text.intermediate_size = args.hidden, args.intermediate
    text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = args.layers, args.heads, args.kv_heads
    text.head_dim = args.hidden // args.heads
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:  # built where it runs, in its dtype, with the attention the tool loads
        base = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                          attn_implementation=attention.register()).eval()
        with torch.no_grad():
            base.lm_head.weight.normal_(0.0, 1.0)  # peaked logits: greedy tokens stable under rounding
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=LM_TARGETS + r"|.*multi_modal_projector\.linear_[12]", init_lora_weights=False)
    unmerged = get_peft_model(base, lora).eval()
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    adapted = sum(1 for n, _ in unmerged.named_modules() if n.endswith(".lora_A"))
    return unmerged, merged, adapted


def generate(model, input_ids, new_tokens: int, processors=None):
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                             logits_processor=processors)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out[:, input_ids.shape[1]:]


def step_ms(model, input_ids, new_tokens: int) -> float:
    """Median milliseconds between consecutive decoding steps (the prefill excluded)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, ids, scores):
            if scores.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return scores

    generate(model, input_ids, new_tokens, LogitsProcessorList([Clock()]))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)) * 1000


def ops_per_step(model, input_ids, new_tokens: int) -> float:
    """torch operations per decoding step (each is at least one kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (1, 1 + new_tokens):
        Count.calls = 0
        with Count():
            generate(model, input_ids, n)
        counts.append(Count.calls)
    return (counts[1] - counts[0]) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=896)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--prompt_tokens", type=int, default=600, help="about an image's 576 tokens plus the text")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the same for both)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    unmerged, merged, adapted = build(args)
    vocab = unmerged.config.text_config.vocab_size
    input_ids = torch.randint(0, vocab - 16, (args.batch_size, args.prompt_tokens), device=args.device)
    same = torch.equal(generate(unmerged, input_ids, args.new_tokens), generate(merged, input_ids, args.new_tokens))
    ops = {"unmerged (PEFT)": ops_per_step(unmerged, input_ids, 8), "merged": ops_per_step(merged, input_ids, 8)}
    times: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(args.repeats):  # interleaved, alternating which goes first
        pair = [("unmerged (PEFT)", unmerged), ("merged", merged)]
        for name, model in pair if r % 2 == 0 else pair[::-1]:
            times[name].append(step_ms(model, input_ids, args.new_tokens))
    print(f"\n{args.layers} text layers, hidden {args.hidden}, {adapted} LoRA layers (r=16); batch {args.batch_size}, "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} steps; {args.device}, torch threads {args.threads}, "
          f"torch {torch.__version__}; {args.repeats} interleaved repeats")
    print("| adapter         | ms per decoding step, min / median / max | torch ops per step |")
    print("|-----------------|-----------------------------------------:|-------------------:|")
    for name, ms in times.items():
        spread = f"{min(ms):.1f} / {statistics.median(ms):.1f} / {max(ms):.1f}"
        print(f"| {name:<15} | {spread:>40} | {ops[name]:>18.0f} |")
    ratio = statistics.median(times["unmerged (PEFT)"]) / statistics.median(times["merged"])
    print(f"unmerged / merged: {ratio:.2f}x the time per step; same greedy tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
