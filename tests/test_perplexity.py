"""Token perplexity against hand computations on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from gemvlab.errors import GemvlabError
from gemvlab.eval.guards import check_finite
from gemvlab.eval.perplexity import plan_windows, token_perplexity
from tests.tiny import make_llama

VOCAB = 50


@pytest.fixture(scope="module")
def model():
    return make_llama(VOCAB, seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB - 1, (61,), generator=torch.Generator().manual_seed(7))


def hand_nll(model, window: list[int], scored_from: int) -> tuple[float, int]:
    """Sum of -log p(token) for window positions >= scored_from, one softmax at a time."""
    with torch.no_grad():
        logits = model(torch.tensor([window])).logits[0].double()
    total, count = 0.0, 0
    for pos in range(max(scored_from, 1), len(window)):
        probs = torch.softmax(logits[pos - 1], dim=-1)
        total -= math.log(probs[window[pos]].item())
        count += 1
    return total, count


def test_single_window_equals_hf_causal_lm_loss(model, ids):
    result = token_perplexity(model, ids, context_length=len(ids), stride=len(ids))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    assert result.tokens == len(ids) - 1
    assert result.ppl == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_disjoint_windows_match_hand_computation(model, ids, batch_size):
    ctx = 8
    total, count = 0.0, 0
    for begin in range(0, len(ids), ctx):
        nll, n = hand_nll(model, ids[begin:begin + ctx].tolist(), 1)
        total, count = total + nll, count + n
    result = token_perplexity(model, ids, context_length=ctx, stride=ctx, batch_size=batch_size)
    assert result.tokens == count
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-6)


def test_sliding_windows_follow_the_hf_recipe(model, ids):
    """The transformers docs' strided recipe: labels of already-scored tokens set to -100."""
    ctx, stride = 10, 4
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            out = model(window, labels=labels)
        scored = int((labels[:, 1:] != -100).sum())
        total += out.loss.item() * scored
        count += scored
        prev_end = end
        if end == len(ids):
            break
    result = token_perplexity(model, ids, context_length=ctx, stride=stride, batch_size=2)
    assert result.tokens == count == len(ids) - 1
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bos_per_window_scores_every_token_once(model, ids):
    bos, ctx = VOCAB - 1, 9
    total, count = 0.0, 0
    for begin in range(0, len(ids), ctx - 1):
        nll, n = hand_nll(model, [bos, *ids[begin:begin + ctx - 1].tolist()], 1)
        total, count = total + nll, count + n
    result = token_perplexity(model, ids, context_length=ctx, stride=ctx, bos_id=bos)
    assert count == result.tokens == len(ids)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-6)


@pytest.mark.parametrize("n,ctx,stride,bos", [(61, 8, 8, False), (61, 10, 3, False),
                                              (61, 9, 4, True), (5, 16, 16, True)])
def test_windows_cover_each_token_at_most_once(n, ctx, stride, bos):
    """Only GPTQ's disjoint windows without BOS leave each window's first token unscored."""
    seen: list[int] = []
    for w in plan_windows(n, ctx, stride, bos):
        assert w.end - w.begin + int(bos) <= ctx
        seen.extend(range(w.first_scored, w.end))
    unscored = set() if bos else {0}
    if not bos and stride == ctx:
        unscored |= set(range(0, n, ctx))
    assert seen == [p for p in range(n) if p not in unscored]


def test_bad_window_settings_are_refused(model, ids):
    with pytest.raises(GemvlabError, match="stride"):
        token_perplexity(model, ids, context_length=8, stride=9)


def test_nan_weights_stop_with_a_clear_error(ids):
    broken = make_llama(VOCAB, seed=3)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    with pytest.raises(GemvlabError, match="NaN or inf"):
        token_perplexity(broken, ids, context_length=16, stride=16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_logit_is_caught(bad):
    logits = torch.randn(2, 7, 50)
    check_finite(logits, "test")
    logits[1, 3, 17] = bad
    with pytest.raises(GemvlabError, match=r"NaN or inf in model outputs \(1 values"):
        check_finite(logits, "test")
