"""Decoding attention per KV head (jjvmed/attention.py): the same numbers and the same greedy text as
transformers' SDPA attention, eager and compiled, and no copy of the KV cache in the compiled step.

The model here has the 8B's grouped-query ratio: 8 query heads share 2 KV heads (the 8B: 32 and 8).
The compiled path runs with torch.compile's "eager" backend (the same graph capture, no code generation).
"""

from __future__ import annotations

import types

import pytest
import torch
from test_generation_speed import mixed_prompt_batches
from tiny_llava import build_tiny_llava

from jjvmed import generation
from jjvmed.attention import GROUPED_SDPA, grouped_sdpa_forward
from jjvmed.model import ModelSpec, load_model

HEADS, KV_HEADS = 8, 2  # a ratio of 4, like Llama-3-8B's 32 / 8


@pytest.fixture(scope="module")
def gqa_bundle(tmp_path_factory):
    folder = build_tiny_llava(tmp_path_factory.mktemp("tiny-gqa4"), heads=HEADS, kv_heads=KV_HEADS)
    return load_model(ModelSpec(str(folder), None, device="cpu"))


def repeated_kv_reference(query, key, value, mask, scale):
    """Attention as transformers' SDPA path runs it with a mask: K/V repeated to every query head."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def decoding_inputs(batch: int = 3, slots: int = 37, head_dim: int = 16):
    torch.manual_seed(0)
    query = torch.randn(batch, 1, HEADS, head_dim).transpose(1, 2)  # laid out as the Llama attention gives it
    key, value = torch.randn(batch, KV_HEADS, slots, head_dim), torch.randn(batch, KV_HEADS, slots, head_dim)
    mask = torch.ones(batch, 1, 1, slots, dtype=torch.bool)
    mask[0, ..., :5] = False  # left padding
    mask[2, ..., -7:] = False  # static-cache slots not written yet
    return query, key, value, mask


def test_grouped_decoding_attention_equals_sdpa_with_a_padding_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, training=False, is_causal=True)
    query, key, value, mask = decoding_inputs()
    scale = query.shape[-1] ** -0.5
    reference = repeated_kv_reference(query, key, value, mask, scale)
    float_mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    for m in (mask, float_mask, mask.expand(-1, HEADS, -1, -1)):  # bool, additive, one row per head
        grouped, _ = grouped_sdpa_forward(module, query, key, value, m, scaling=scale)
        stock, _ = sdpa_attention_forward(module, query, key, value, m, scaling=scale)
        assert grouped.shape == stock.shape == (3, 1, HEADS, query.shape[-1])
        torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grouped, stock, rtol=1e-5, atol=1e-6)


def test_prefill_is_left_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, training=False, is_causal=True)
    torch.manual_seed(1)
    query = torch.randn(2, HEADS, 9, 16)
    key, value = torch.randn(2, KV_HEADS, 9, 16), torch.randn(2, KV_HEADS, 9, 16)
    mask = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
    assert torch.equal(grouped_sdpa_forward(module, query, key, value, mask)[0],
                       sdpa_attention_forward(module, query, key, value, mask)[0])


def test_models_are_loaded_with_the_grouped_attention(gqa_bundle):
    model, _, _ = gqa_bundle
    assert model.config.text_config._attn_implementation == GROUPED_SDPA


def generated(model, processor, batches, **kwargs) -> dict[str, str]:
    gen = {"max_new_tokens": 10, "do_sample": False, "num_beams": 1}
    return {r.id: r.text for batch in generation.generate_batches(model, processor, batches, gen, **kwargs)
            for r in batch}


def test_grouped_attention_gives_the_sdpa_text_eager_and_compiled(gqa_bundle):
    import torch._dynamo

    model, processor, _ = gqa_bundle
    batches = mixed_prompt_batches(processor, [4, 3])
    texts = {}
    try:
        for implementation in (GROUPED_SDPA, "sdpa"):
            model.set_attn_implementation(implementation)
            texts[implementation, "eager"] = generated(model, processor, batches)
            torch._dynamo.reset()
            texts[implementation, "compiled"] = generated(model, processor, batches, compile_backend="eager",
                                                          batch_size=4)
    finally:
        model.set_attn_implementation(GROUPED_SDPA)
        torch._dynamo.reset()
    reference = texts["sdpa", "eager"]
    assert len(reference) == 7 and len(set(reference.values())) > 3
    assert all(t == reference for t in texts.values())


def test_the_compiled_decoding_step_attends_on_the_kv_heads_without_copying_them(gqa_bundle):
    """The graph torch.compile captures for a decoding step: its attention reads K/V with 2 heads, not 8
    repeated ones (transformers' SDPA path repeats them whenever there is a mask, as a static cache has)."""
    import torch._dynamo

    model, processor, _ = gqa_bundle
    attention_shapes = []

    def spy(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if "scaled_dot_product_attention" in str(node.target):
                attention_shapes.append([tuple(a.meta["example_value"].shape) for a in node.args[:3]])
        return graph_module.forward

    torch._dynamo.reset()
    try:
        generated(model, processor, mixed_prompt_batches(processor, [2]), compile_backend=spy, batch_size=2)
    finally:
        torch._dynamo.reset()
    assert attention_shapes  # one per text layer
    for query, key, value in attention_shapes:
        assert key[1] == value[1] == KV_HEADS
        assert query[:3] == (2, KV_HEADS, HEADS // KV_HEADS)
