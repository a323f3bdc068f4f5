"""The attention function that runs every layer against a KVCache (transformers' interface).

The model runs with ``use_cache=False`` and explicit position ids, so transformers sees a
stateless forward; this function appends each block's keys and values to our cache, attends
over the live slots (masked by original position when several queries arrive at once), and,
for scoring policies, adds the block's attention to each key's accumulated score.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gemvlab.kv.evict.cache import KVCache
from gemvlab.kv.evict.policies import score_contribution

NAME = "gemvlab_kv"
_ACTIVE: contextvars.ContextVar[KVCache | None] = contextvars.ContextVar("gemvlab_kv_cache",
                                                                         default=None)
# Scoring materialises (B, H, rows, n) float32 logits: rows per block keep that near 256 MiB
# on the CPU and 1 GiB on a GPU (fewer, larger blocks: fewer launches).
_SCORE_BLOCK_ELEMENTS = {"cpu": 2**26, "cuda": 2**28}


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, Hkv, q, n) mask from original positions: causal, and the sliding window if any."""
    ok = k_pos.unsqueeze(-2) <= q_pos.view(1, 1, -1, 1)
    if window:
        ok &= k_pos.unsqueeze(-2) > q_pos.view(1, 1, -1, 1) - window
    return ok


def _grouped_logits(query: torch.Tensor, keys: torch.Tensor, scaling: float,
                    softcap: float | None) -> torch.Tensor:
    """Logits (B, Hkv, groups, q, n) without repeating the keys for each query head."""
    b, hq, q, d = query.shape
    hkv = keys.shape[1]
    grouped = query.view(b, hkv, hq // hkv, q, d)
    logits = torch.matmul(grouped, keys.unsqueeze(2).transpose(-1, -2)) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: torch.Tensor | None, causal: bool, scaling: float,
            softcap: float | None) -> torch.Tensor:
    """Attention output (B, Hq, q, Dv): sdpa, or eager where logits are soft-capped."""
    groups = query.shape[1] // keys.shape[1]
    if softcap:
        logits = _grouped_logits(query, keys, scaling, softcap)
        if causal:
            q, n = logits.shape[-2:]
            mask = torch.ones(q, n, dtype=torch.bool, device=query.device).tril(n - q)
        if mask is not None:
            logits = logits.masked_fill(~mask.unsqueeze(2) if mask.dim() == 4 else ~mask,
                                        float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values.unsqueeze(2))
        return out.flatten(1, 2)
    if mask is not None:
        mask = mask.repeat_interleave(groups, dim=1)
        if groups > 1:
            keys, values = (t.repeat_interleave(groups, dim=1) for t in (keys, values))
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    return F.scaled_dot_product_attention(query, keys, values, is_causal=causal, scale=scaling,
                                          enable_gqa=groups > 1)


def _add_scores(cache: KVCache, slots, query: torch.Tensor, keys: torch.Tensor,
                q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, scaling: float,
                softcap: float | None) -> None:
    """Accumulate the policy's score over query blocks small enough to fit in memory."""
    b, hq, q, _ = query.shape
    n = keys.shape[2]
    rows = max(1, _SCORE_BLOCK_ELEMENTS.get(query.device.type, 2**26) // max(1, b * hq * n))
    generator = cache.generator(query.device)
    for start in range(0, q, rows):
        stop = min(q, start + rows)
        logits = _grouped_logits(query[:, :, start:stop], keys, scaling, softcap)
        block_ok = _allowed(q_pos[start:stop], k_pos, window)
        logits = logits.masked_fill(~block_ok.unsqueeze(2), float("-inf"))
        for scorer in cache.scorers:
            slots.scores[scorer.score][:, :, :n] += score_contribution(
                scorer, logits, cache.temperature(scorer), generator)


def kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                 dropout: float = 0.0, sliding_window: int | None = None,
                 softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; the cache comes from the bound session."""
    cache = _ACTIVE.get()
    if cache is None or cache.query_positions is None:
        raise RuntimeError("gemvlab_kv attention runs only inside "
                           "gemvlab.kv.evict.generate's loops")
    slots = cache.layer(module.layer_idx)
    was_empty = slots.n == 0
    q_pos = cache.query_positions
    slots.append(key, value, q_pos, cache.capacity, cache.score_kinds)
    keys, values, k_pos = slots.live()
    q = query.shape[2]
    window = int(sliding_window) if sliding_window else None
    needs_window = window is not None and int(k_pos.max() - k_pos.min()) >= window
    if was_empty and not needs_window:
        out = _attend(query, keys, values, None, q > 1, scaling, softcap)
    elif q == 1 and not needs_window:
        out = _attend(query, keys, values, None, False, scaling, softcap)
    else:
        out = _attend(query, keys, values, _allowed(q_pos, k_pos, window), False, scaling,
                      softcap)
    if cache.scorers:
        _add_scores(cache, slots, query, keys, q_pos, k_pos, window, scaling, softcap)
    cache.evict_layer(module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, kv_attention)


@contextlib.contextmanager
def bound(model: torch.nn.Module, cache: KVCache) -> Iterator[KVCache]:
    """Run ``model``'s attention through ``cache`` inside the block, then restore it."""
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)
