"""The KV cache and its eviction policies: exactness at full budget, the tokens each rule
keeps on hand-made attention, original positions after eviction, Gemma 3's sliding layers."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from gemvlab.kv.evict import attention
from gemvlab.kv.evict.analysis import attention_concentration
from gemvlab.kv.evict.attention import bound
from gemvlab.kv.evict.cache import KVCache
from gemvlab.kv.evict.generate import (
    FULL,
    continuation_steps,
    decode,
    fork,
    generate,
    make_cache,
    prefill,
    score_continuation,
)
from gemvlab.kv.evict.policies import KVPolicy, evict_one, keep_indices, score_contribution
from gemvlab.kv.evict.speed_bench import speed_metrics
from tests.tiny import make_gemma3, make_llama

WINDOW = KVPolicy("window")
STREAMING = KVPolicy("streaming", sinks=4)
H2O = KVPolicy("h2o", score="attention", recent_share=0.5)
KEYFORMER = KVPolicy("keyformer", score="gumbel", recent_share=0.3)
POLICIES = [WINDOW, STREAMING, H2O, KEYFORMER]


def _ids(batch: int, n: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _gemma(seed: int = 0) -> transformers.PreTrainedModel:
    return make_gemma3(64, ["sliding_attention", "sliding_attention", "full_attention"], seed,
                       max_len=256)


@pytest.fixture(params=["llama", "gemma3"])
def model(request):
    m = make_llama(64, seed=0) if request.param == "llama" else _gemma()
    m.set_attn_implementation("sdpa")
    return m


def test_full_budget_reproduces_the_models_logits_exactly(model):
    ids = _ids(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
        steps = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))
    cache = make_cache(FULL, None, 24, 6)
    from gemvlab.kv.evict.generate import _forward

    with torch.no_grad(), bound(model, cache):
        ours = _forward(model, cache, ids, 0, last_only=False)
    assert torch.equal(ours, ref)
    out = generate(model, ids, FULL, None, 6)
    assert torch.equal(out.tokens, steps.sequences[:, 24:])
    # the decoding steps' logits too, against transformers' own DynamicCache generation
    cache = make_cache(FULL, None, 24, 6)
    with torch.no_grad(), bound(model, cache):
        logits = _forward(model, cache, ids, 0, last_only=True)[:, -1]
        for step, expected in enumerate(steps.logits):
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
            token = logits.argmax(-1)
            logits = _forward(model, cache, token[:, None], 24 + step, last_only=True)[:, -1]


def test_full_policy_perplexity_equals_the_models_own():
    model = make_llama(64, seed=1)
    ids = _ids(1, 60, seed=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    expected = -logp[0, 29:-1].gather(-1, ids[0, 30:, None]).sum().item()
    last, shared = prefill(model, ids[:, :30])
    cache = fork(shared, FULL, None, 30, 30, chunk=7)
    scored = score_continuation(model, ids, cache, last, 30, chunk=7)
    assert scored.tokens == 30
    assert scored.nll_sum == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("budget", [0.2, 0.5, 0.9])
def test_each_policy_keeps_exactly_its_budget_and_shrinks_the_tensors(model, policy, budget):
    ids = _ids(2, 30)
    out = generate(model, ids, policy, budget, 8)
    tokens = math.ceil(budget * 30)
    assert out.kept_tokens == tokens
    cache = make_cache(policy, budget, 30, 8)
    last, _ = None, None
    from gemvlab.kv.evict.generate import _forward

    with torch.no_grad(), bound(model, cache):
        last = _forward(model, cache, ids, 0, last_only=True)[:, -1]
        for layer in cache.layers.values():
            assert layer.n == tokens and layer.keys.shape[2] == tokens + 1  # physically small
        decode(model, cache, last, 30, 5)
    for layer in cache.layers.values():
        assert layer.n == tokens
        live = layer.positions[:, :, : layer.n]
        assert live.unique(dim=-1).shape[-1] == tokens       # no token twice
        assert int(live.max()) == 30 + 5 - 2                   # the newest token is kept


def test_prompt_only_compression_lets_the_cache_grow_while_decoding():
    model = make_llama(64, seed=0)
    policy = KVPolicy("streaming_prompt", sinks=4, decode_evicts=False)
    cache = make_cache(policy, 0.5, 30, 6)
    last, _ = None, None
    from gemvlab.kv.evict.generate import _forward

    with torch.no_grad(), bound(model, cache):
        last = _forward(model, cache, _ids(1, 30), 0, last_only=True)[:, -1]
    assert cache.tokens() == 15
    decode(model, cache, last, 30, 6)
    assert cache.tokens() == 15 + 5
    assert set(cache.layers[0].positions[0, 0, :20].tolist()) == {0, 1, 2, 3, *range(19, 35)}


def test_shared_prefill_and_fork_give_what_a_single_run_gives(model):
    ids = _ids(1, 28, seed=5)
    last, shared = prefill(model, ids, POLICIES, seed=3)
    for policy in POLICIES:
        alone = generate(model, ids, policy, 0.5, 6, seed=3)
        forked = decode(model, fork(shared, policy, 0.5, 28, 6, seed=3), last, 28, 6)
        assert torch.equal(alone.tokens, forked.tokens), policy.name


def test_rules_on_hand_made_scores():
    positions = torch.arange(20).view(1, 1, 20)
    scores = torch.linspace(0.1, 0.0, 20).view(1, 1, 20)      # older tokens score a bit more
    scores[0, 0, [2, 7, 11]] = torch.tensor([5.0, 9.0, 3.0])
    kept = lambda p, b: set(keep_indices(p, scores, positions, b)[0, 0].tolist())  # noqa: E731
    assert kept(WINDOW, 6) == set(range(14, 20))
    assert kept(STREAMING, 6) == {0, 1, 2, 3, 18, 19}
    assert kept(H2O, 6) == {2, 7, 11, 17, 18, 19}              # 3 heavy hitters + 3 recent
    assert kept(KEYFORMER, 10) == {2, 7, 11, 17, 18, 19} | {0, 1, 3, 4}  # 30% recent
    # one eviction when budget + 1 tokens are held: the lowest-priority unprotected token
    assert int(evict_one(H2O, scores[..., :7], positions[..., :7], 6)) == 3  # 4-6 recent
    assert int(evict_one(WINDOW, None, positions[..., :7], 6)) == 0
    assert int(evict_one(STREAMING, None, positions[..., :7], 6)) == 4


def _run_attention(policy: KVPolicy, budget: int, key: torch.Tensor,
                   query: torch.Tensor) -> KVCache:
    """One prefill through kv_attention on hand-made (B, H, n, D) queries and keys."""
    n = key.shape[2]
    cache = KVCache(policy, budget, budget + 1, 4, seed=0)
    cache.query_positions = torch.arange(n)
    module = torch.nn.Module()
    module.layer_idx = 0
    token = attention._ACTIVE.set(cache)
    try:
        attention.kv_attention(module, query, key, key.clone(), None, scaling=1.0)
    finally:
        attention._ACTIVE.reset(token)
    return cache


def test_h2o_and_keyformer_keep_the_keys_that_draw_attention():
    n, d = 16, 16
    key = torch.zeros(1, 1, n, d)
    key[0, 0, torch.arange(n), torch.arange(n)] = 1.0   # key i points along axis i
    query = torch.zeros(1, 1, n, d)
    query[0, 0, :, 3] = 8.0                             # every query looks at key 3 ...
    query[0, 0, 9:, 9] = 10.0                           # ... and at key 9 once it exists
    for policy in (H2O, KEYFORMER):
        cache = _run_attention(policy, 6, key, query)
        kept = set(cache.layers[0].positions[0, 0, :6].tolist())
        recent = policy.recent_tokens(6)
        assert set(range(n - recent, n)) <= kept
        assert {3, 9} <= kept, policy.name
    window = _run_attention(WINDOW, 6, key, query)
    assert set(window.layers[0].positions[0, 0, :6].tolist()) == set(range(10, 16))


def test_score_contributions_follow_their_formulas():
    logits = torch.randn(1, 2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    h2o = score_contribution(H2O, logits, 1.0, None)
    torch.testing.assert_close(h2o, logits.softmax(-1).sum(dim=(2, 3)))
    gen = torch.Generator().manual_seed(7)
    ours = score_contribution(KEYFORMER, logits, 1.5, gen)
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(7)).clamp(1e-20,
                                                                                   1 - 1e-7)
    expected = ((logits - torch.log(-torch.log(u))) / 1.5).softmax(-1).sum(dim=(2, 3))
    torch.testing.assert_close(ours, expected)
    assert KEYFORMER.temperature(0, 10) == 1.0 and KEYFORMER.temperature(10, 10) == 2.0
    assert KEYFORMER.temperature(5, 10) == pytest.approx(1.5)


def test_evicted_tokens_keep_their_original_positions():
    """The next token's logits with a window cache equal a full forward in which the last query
    sees only the kept keys at their original positions, and differ from re-positioned keys."""
    model = make_llama(64, seed=3)
    model.set_attn_implementation("eager")
    ids = _ids(1, 20, seed=4)
    out = generate(model, ids, WINDOW, 0.4, 2)                  # keeps positions 12 ... 19
    cache = make_cache(WINDOW, 0.4, 20, 2)
    from gemvlab.kv.evict.generate import _forward

    nxt = out.tokens[:, :1]
    with torch.no_grad(), bound(model, cache):
        _forward(model, cache, ids, 0, last_only=True)
        ours = _forward(model, cache, nxt, 20, last_only=True)[0, -1]
    with torch.no_grad():
        full = torch.cat([ids, nxt], dim=1)
        allowed = torch.ones(21, 21).tril().bool()
        allowed[20, :12] = False
        mask = torch.zeros(1, 1, 21, 21).masked_fill(~allowed, float("-inf"))
        ref = model(full, attention_mask=mask).logits[0, -1]
        shifted = model(torch.cat([ids[:, 12:], nxt], dim=1)).logits[0, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, shifted, atol=1e-3)


def test_gemma_sliding_layers_never_see_keys_past_their_window():
    model = _gemma(seed=2)
    model.set_attn_implementation("eager")
    ids = _ids(1, 20, seed=6)
    with torch.no_grad():
        ref = model(ids).logits
    from gemvlab.kv.evict.generate import _forward

    cache = make_cache(FULL, None, 20, 0)
    with torch.no_grad(), bound(model, cache):
        ours = _forward(model, cache, ids, 0, last_only=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_bad_policies_and_budgets_are_refused():
    with pytest.raises(ValueError, match="score"):
        KVPolicy("x", score="magic")
    with pytest.raises(ValueError, match="recent_share"):
        KVPolicy("x", score="attention", recent_share=1.5)
    with pytest.raises(ValueError, match="share of the prompt"):
        make_cache(H2O, 1.5, 10, 1)
    last, shared = prefill(make_llama(64), _ids(1, 10), [H2O])
    with pytest.raises(ValueError, match="gumbel"):
        fork(shared, KEYFORMER, 0.5, 10, 2)
    assert continuation_steps(100, 40, 16) == 4


def test_attention_concentration_on_hand_made_probabilities():
    n = 10
    probs = torch.zeros(1, 1, n, n)
    for q in range(n):
        probs[0, 0, q, 0] = 0.95                          # a sink holds 95% of every row
        probs[0, 0, q, 1:q + 1] = 0.05 / q if q else 0.0
        if q == 0:
            probs[0, 0, 0, 0] = 1.0
    stats = attention_concentration(probs, 0.9, [0.1, 0.5], min_query=4)
    visible = torch.arange(4, n) + 1
    assert stats["keys_for_mass"] == pytest.approx(float((1 / visible).mean()))
    assert stats["mass_top10"] == pytest.approx(0.95)
    with pytest.raises(ValueError):
        attention_concentration(probs, 0.9, [0.1], min_query=n)


def test_speed_metrics_ratios_against_the_full_cache():
    rows = [
        {"policy": "full", "budget": "100", "context": 8, "batch": 1, "oom": 0, "step_ms": 10.0,
         "tokens_per_s": 100.0, "total_ms": 100.0},
        {"policy": "keyformer", "budget": "50", "context": 8, "batch": 1, "oom": 0,
         "step_ms": 5.0, "tokens_per_s": 200.0, "total_ms": 80.0},
        {"policy": "full", "budget": "100", "context": 8, "batch": 4, "oom": 1},
        {"policy": "keyformer", "budget": "50", "context": 8, "batch": 4, "oom": 0,
         "step_ms": 8.0, "tokens_per_s": 500.0, "total_ms": 90.0},
    ]
    m = speed_metrics(rows)
    assert m["ratio/keyformer/50/8/1/latency"] == 2.0
    assert m["ratio/keyformer/50/8/1/total_latency"] == 1.25
    assert "ratio/keyformer/50/8/4/latency" not in m               # full ran out of memory
    assert m["speed/full/100/8/4/oom"] == 1.0
    assert m["best/keyformer/50/8/throughput_ratio"] == 5.0
