"""The quantized KV cache: exact with quantization off, one view per query, real packed bytes."""

from __future__ import annotations

import math

import pytest
import torch

from gemvlab.kv.quant import commvq
from gemvlab.kv.quant.codecs import CommVQCodec, KiviCodec
from gemvlab.kv.quant.quant_cache import (
    QuantKVCache,
    collect,
    continuation_nll,
    forward_chunk,
    greedy,
    model_rotation,
    prefill,
    quantized_before,
)
from tests.test_commvq import key_bits_per_token
from tests.tiny import make_llama

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return make_llama(VOCAB, seed=3)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _commvq_codec(model, bits: int = 2) -> CommVQCodec:
    """Codebooks trained briefly on the tiny model's own keys and values."""
    keys, values = collect(model, [_ids(96, seed=5)])
    books, codecs = [], []
    for k, v in zip(keys, values, strict=True):
        book, _ = commvq.train_key_codebook(k, stages=3, levels=4, iters=3,
                                            temperatures=(0.0, 0.0), seed=0)
        books.append(book)
        codecs.append(commvq.train_value_codecs([v.flatten(1)], bits, steps=5, batch=32, lr=1e-2,
                                                tau=1.0, seed=0)[0])
    return CommVQCodec(bits, books, codecs, model_rotation(model))


def test_quantization_off_reproduces_the_models_logits_exactly(model):
    ids = _ids(40)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        prompt_ref = model(input_ids=ids[:, :24], logits_to_keep=1).logits
    last, cache = prefill(model, ids[:, :24], window=8)
    assert torch.equal(last, prompt_ref[:, -1])  # bit for bit at the prompt
    chunk = forward_chunk(model, cache, ids[:, 24:32], 24)
    torch.testing.assert_close(chunk, ref[:, 24:32], rtol=1e-5, atol=1e-5)
    step = forward_chunk(model, cache, ids[:, 32:33], 32)
    torch.testing.assert_close(step, ref[:, 32:33], rtol=1e-5, atol=1e-5)


def test_quantized_before_keeps_the_window_and_whole_groups():
    assert quantized_before(10, window=8, group=1) == 2
    assert quantized_before(7, window=8, group=1) == 0
    assert quantized_before(8 + 31, window=8, group=32) == 0
    assert quantized_before(8 + 32, window=8, group=32) == 32
    assert quantized_before(8 + 70, window=8, group=32) == 64


@pytest.mark.parametrize("kind", ["kivi", "commvq"])
def test_a_chunk_sees_what_token_by_token_decoding_sees(model, kind):
    codec = KiviCodec(2, group=8) if kind == "kivi" else _commvq_codec(model)
    ids = _ids(48, seed=1)
    _, shared = prefill(model, ids[:, :12], window=4)
    chunked = shared.fork(codec)
    stepwise = shared.fork(codec)
    chunk_logits = forward_chunk(model, chunked, ids[:, 12:40], 12)
    step_logits = torch.cat([forward_chunk(model, stepwise, ids[:, t:t + 1], t)
                             for t in range(12, 40)], dim=1)
    torch.testing.assert_close(chunk_logits, step_logits, rtol=1e-4, atol=1e-4)
    assert chunked.layers[0].quantized == stepwise.layers[0].quantized > 0
    # And the quantization matters: the logits differ from full precision.
    _, fp = prefill(model, ids[:, :12], window=4)
    fp_logits = forward_chunk(model, fp, ids[:, 12:40], 12)
    assert not torch.allclose(chunk_logits, fp_logits, atol=1e-3)


def test_the_cache_holds_the_codecs_packed_bytes(model):
    ids = _ids(64, seed=2)
    _, shared = prefill(model, ids, window=16)
    cache = shared.fork(KiviCodec(2, group=8))
    layer = cache.layers[0]
    q, (heads, dim) = layer.quantized, layer.tail_k.shape[1:]
    assert q == quantized_before(64, 16, 8) == 48
    # 2-bit codes for keys and values, fp16 scale and zero per group of 8.
    per_layer = 2 * (q * heads * dim * 2 // 8 + 2 * 2 * q * heads * dim // 8)
    tail = 2 * 2 * (64 - q) * heads * dim
    assert cache.nbytes() == len(cache.layers) * (per_layer + tail)
    dense = QuantKVCache(None, 16, len(cache.layers))
    assert dense.nbytes() == 0


def test_commvq_codec_counts_its_bits_exactly(model):
    codec = _commvq_codec(model, bits=2)
    ids = _ids(40, seed=4)
    _, shared = prefill(model, ids, window=8)
    cache = shared.fork(codec)
    layer = cache.layers[0]
    packed = layer.packed[0]
    heads = layer.tail_k.shape[1]
    book = codec.key_books[0]
    t = packed.tokens
    # Per token: R pairs of log2(L)-bit indices per head, a fp16 norm; rows value bits, a fp16
    # scale (whole bytes per token row).
    key_bytes = math.ceil(heads * book.stages * 2 * math.log2(book.levels) / 8) + 2
    value_bytes = math.ceil(codec.value_codecs[0].rows / 8) + 2
    expected = t * (key_bytes + value_bytes)
    assert key_bits_per_token(heads, book.stages, book.levels) == \
        heads * book.stages * 2 * math.log2(book.levels) + 16
    assert packed.nbytes == expected


def test_decoded_copy_equals_decoding_the_packed_codes(model):
    codec = _commvq_codec(model)
    ids = _ids(40, seed=6)
    _, shared = prefill(model, ids, window=8)
    cache = shared.fork(codec)
    layer = cache.layers[1]
    k, v = codec.decompress(1, layer.packed[0], layer.dense_k.dtype)
    assert torch.equal(k, layer.dense_k) and torch.equal(v, layer.dense_v)


def test_continuation_and_greedy_run_through_the_cache(model):
    ids = _ids(40, seed=7)
    _, shared = prefill(model, ids[:, :20], window=4)
    nll, n = continuation_nll(model, shared.fork(KiviCodec(1, group=8)), ids, 20, chunk=7)
    assert n == 19 and math.isfinite(nll) and nll > 0
    last, shared = prefill(model, ids[:, :20], window=4)
    tokens = greedy(model, shared.fork(None), last, 20, 5, stops=[])
    with torch.no_grad():
        ref = model.generate(ids[:, :20], max_new_tokens=5, do_sample=False)
    assert tokens == ref[0, 20:].tolist()


def test_collected_keys_are_the_models_keys_before_rope(model):
    ids = _ids(16, seed=8)
    keys, values = collect(model, [ids])
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(hidden).view(16, -1, attn.head_dim)
        v = attn.v_proj(hidden).view(16, -1, attn.head_dim)
    torch.testing.assert_close(keys[0], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[0], v)
