"""Attention for decoding steps without copying the KV cache: the queries grouped by KV head.

Llama-3-8B has 32 query heads sharing 8 KV heads. In transformers 5's SDPA attention, grouped-query
attention is used only when there is no mask; a static KV cache (the compiled path) always has one, and
so, on 5.17 in every decoding step and on 5.24 under torch.compile, K and V are repeated 4x over every
cache slot in every layer before attending: ~1.1 MiB moved per cached token per sequence, against the
0.125 MiB the cache holds (README, Throughput).

A decoding step has one query token per sequence, so the 4 query heads of a group can play the part of
the query length instead: q (batch, 32, 1, 128) is viewed as (batch, 8, 4, 128) and attends to the
un-repeated K/V (batch, 8, slots, 128) in one SDPA call, the mask row (batch, 1, 1, slots) broadcast over
the group. Same numbers, no copy. Prefill (more than one query token) is left to transformers' SDPA.

It is registered with transformers' attention interface under `GROUPED_SDPA`, with SDPA's mask, so
eager `generate` and the compiled static-cache step both use it: load with
`attn_implementation=GROUPED_SDPA` after `register()`.
"""

from __future__ import annotations

GROUPED_SDPA = "grouped_sdpa"


def grouped_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; (output (batch, q_len, heads, head_dim), None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if q_len != 1 or kv_heads == heads or special or (module is not None and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    group = heads // kv_heads  # query head h reads KV head h // group, as transformers' repeat_kv lays them out
    grouped = query.reshape(batch, kv_heads, group, head_dim)
    mask = attention_mask
    if mask is not None and mask.shape[1] != 1:  # a mask per query head: group it the same way
        mask = mask.reshape(mask.shape[0], kv_heads, group, mask.shape[-1])
    # is_causal stays False: the group rows are heads, not positions, and all see the same keys.
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=False)
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `GROUPED_SDPA` a valid `attn_implementation` (idempotent); returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_forward)
    # Without a mask function of its own name, transformers builds no mask at all for a custom attention.
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    return GROUPED_SDPA
