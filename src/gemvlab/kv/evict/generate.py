"""Greedy generation and teacher-forced scoring through a KVCache that evicts as it goes.

A prompt is prefilled with full attention, the cache shrinks to the budget, and tokens then
arrive one at a time (or ``chunk`` at a time when scoring a long text), the cache evicting
after every forward pass. Positions are the tokens' original ones, whatever the cache holds.
``prefill`` + ``KVCache.fork`` let many policies and budgets share one prompt pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gemvlab.bench.timing import Stopwatch
from gemvlab.kv.evict.attention import bound
from gemvlab.kv.evict.cache import KVCache
from gemvlab.kv.evict.policies import KVPolicy, budget_tokens

FULL = KVPolicy("full", evicts=False)


def _forward(model: torch.nn.Module, cache: KVCache, ids: torch.Tensor, start: int,
             last_only: bool) -> torch.Tensor:
    """Logits for ``ids`` (B, q) placed at positions start ... start + q - 1 (each layer
    evicts to the budget as soon as its attention has run). Runs inside ``bound``."""
    q = ids.shape[1]
    positions = torch.arange(start, start + q, device=ids.device)
    cache.query_positions = positions
    out = model(input_ids=ids, position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1),
                use_cache=False, logits_to_keep=1 if last_only else 0)
    return out.logits


def make_cache(policy: KVPolicy, budget: float | None, prompt_tokens: int, new_tokens: int,
               chunk: int = 1, seed: int = 0) -> KVCache:
    """A cache for one prompt: budget is a share of the prompt (None: keep everything)."""
    if not policy.evicts or budget is None:
        return KVCache(FULL, None, prompt_tokens + new_tokens, new_tokens, seed)
    tokens = budget_tokens(budget, prompt_tokens)
    grows = 0 if policy.decode_evicts else new_tokens
    return KVCache(policy, tokens, tokens + chunk + grows, new_tokens, seed)


def fork(shared: KVCache, policy: KVPolicy, budget: float | None, prompt_tokens: int,
         new_tokens: int, chunk: int = 1, seed: int = 0) -> KVCache:
    """``make_cache``'s cache, started from a prompt prefilled once (``prefill``)."""
    fresh = make_cache(policy, budget, prompt_tokens, new_tokens, chunk, seed)
    return shared.fork(fresh.policy, fresh.budget, fresh.capacity, new_tokens, seed)


@torch.no_grad()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, scorers: Sequence[KVPolicy] = (),
            seed: int = 0) -> tuple[torch.Tensor, KVCache]:
    """The prompt's last logits and its full cache, scored for every policy in ``scorers``."""
    cache = KVCache(FULL, None, input_ids.shape[1], 0, seed,
                    scorers=tuple(p for p in scorers if p.needs_scores))
    with bound(model, cache):
        logits = _forward(model, cache, input_ids, 0, last_only=True)
    return logits[:, -1], cache


@dataclass
class Generation:
    tokens: torch.Tensor                  # (B, new) generated ids
    prompt_tokens: int
    kept_tokens: int                      # per layer and head, after the prompt
    kv_bytes: int                         # live key/value bytes after the last step
    prefill_s: float = 0.0
    step_s: list[float] = field(default_factory=list)


@torch.no_grad()
def decode(model: torch.nn.Module, cache: KVCache, last_logits: torch.Tensor,
           prompt_tokens: int, max_new_tokens: int, stop_ids: Sequence[int] = (),
           on_step: Callable[[int], None] | None = None) -> Generation:
    """Greedy decoding after a prompt: ``max_new_tokens`` (fewer once every row stopped)."""
    device = last_logits.device
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(last_logits.shape[0], dtype=torch.bool, device=device)
    kept = cache.tokens()
    token = last_logits.argmax(-1)
    out: list[torch.Tensor] = []
    step_s: list[float] = []
    with bound(model, cache):
        for step in range(1, max_new_tokens + 1):
            out.append(token)
            if stops.numel():
                done |= torch.isin(token, stops)
                if bool(done.all()):
                    break
            if step == max_new_tokens:
                break
            cache.step = step
            with Stopwatch(device) as watch:
                logits = _forward(model, cache, token[:, None], prompt_tokens + step - 1, True)
                token = logits[:, -1].argmax(-1)
            step_s.append(watch.seconds)
            if on_step is not None:
                on_step(step)
    return Generation(torch.stack(out, dim=1), prompt_tokens, kept, cache.nbytes(),
                      step_s=step_s)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, policy: KVPolicy,
             budget: float | None, max_new_tokens: int, stop_ids: Sequence[int] = (),
             seed: int = 0, on_step: Callable[[int], None] | None = None) -> Generation:
    """Prefill, evict in place to the budget, then decode greedily."""
    n = input_ids.shape[1]
    cache = make_cache(policy, budget, n, max_new_tokens, seed=seed)
    with Stopwatch(input_ids.device) as watch, bound(model, cache):
        logits = _forward(model, cache, input_ids, 0, last_only=True)[:, -1]
    result = decode(model, cache, logits, n, max_new_tokens, stop_ids, on_step)
    result.prefill_s = watch.seconds
    return result


@dataclass
class Scored:
    nll_sum: float
    tokens: int
    kept_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(1, self.tokens))


@torch.no_grad()
def score_continuation(model: torch.nn.Module, ids: torch.Tensor, cache: KVCache,
                       last_logits: torch.Tensor, prefix: int, chunk: int = 1) -> Scored:
    """Negative log-likelihood of ids[:, prefix:] after a prefix already in ``cache``.

    The rest arrives ``chunk`` tokens per forward pass, the cache shrinking back to the
    budget after each (chunk 1 is exact token-by-token decoding).
    """
    b, length = ids.shape
    if not 0 < prefix < length:
        raise ValueError(f"prefix {prefix} must leave tokens to score in {length}")
    kept = cache.tokens()
    nll = _nll(last_logits.unsqueeze(1), ids[:, prefix:prefix + 1])
    with bound(model, cache):
        for step, start in enumerate(range(prefix, length - 1, chunk), start=1):
            cache.step = step
            stop = min(start + chunk, length - 1)
            logits = _forward(model, cache, ids[:, start:stop], start, last_only=False)
            nll += _nll(logits, ids[:, start + 1:stop + 1])
    return Scored(float(nll), b * (length - prefix), kept)


def continuation_steps(length: int, prefix: int, chunk: int) -> int:
    """Forward passes ``score_continuation`` makes: Keyformer's total steps for tau."""
    return math.ceil((length - 1 - prefix) / chunk)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).sum().double().cpu()
