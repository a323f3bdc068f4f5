"""KV-cache eviction policies as data plus one rule: which cached tokens to keep.

Every policy is (score, sinks, recent window): tokens in the recent window (the newest
``recent`` positions) and the first ``sinks`` positions are always kept; the rest of the
budget goes to the highest-scoring tokens. Window attention and StreamingLLM score by
position (newest first), H2O by accumulated attention probability, Keyformer by accumulated
Gumbel-softmax probability with a temperature that rises over the decoding steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCORES = ("none", "attention", "gumbel")


@dataclass(frozen=True)
class KVPolicy:
    """One eviction policy; ``evicts=False`` is the full cache."""

    name: str
    evicts: bool = True
    score: str = "none"          # none: position; attention: H2O; gumbel: Keyformer
    recent_share: float = 1.0    # share of the budget held by the newest tokens
    sinks: int = 0               # first positions always kept (StreamingLLM's attention sinks)
    tau_init: float = 1.0        # Keyformer's temperature at the prompt ...
    tau_end: float = 2.0         # ... and after the last decoding step
    decode_evicts: bool = True   # False: compress the prompt only, then let the cache grow

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"policy {self.name}: score={self.score!r} is not one of {SCORES}")
        if not 0.0 <= self.recent_share <= 1.0:
            raise ValueError(f"policy {self.name}: recent_share={self.recent_share} is not in "
                             "[0, 1]")
        if self.sinks < 0:
            raise ValueError(f"policy {self.name}: sinks={self.sinks} is negative")
        if self.score == "gumbel" and not (self.tau_init > 0 and self.tau_end > 0):
            raise ValueError(f"policy {self.name}: temperatures must be positive")
        if self.evicts and self.score == "none" and self.recent_share + self.sinks == 0:
            raise ValueError(f"policy {self.name}: scores by position but keeps no recent token")

    @property
    def needs_scores(self) -> bool:
        return self.evicts and self.score != "none"

    def recent_tokens(self, budget: int) -> int:
        """The recent window in tokens (what the sinks leave of it for window-only policies)."""
        if self.score == "none":
            return max(0, budget - self.sinks)
        return min(budget, round(self.recent_share * budget))

    def temperature(self, step: int, total_steps: int) -> float:
        """Keyformer's schedule: tau_init at the prompt, rising linearly to tau_end."""
        if total_steps <= 0:
            return self.tau_init
        frac = min(max(step / total_steps, 0.0), 1.0)
        return self.tau_init + frac * (self.tau_end - self.tau_init)


def budget_tokens(fraction: float, prompt_tokens: int) -> int:
    """A budget given as a share of the prompt, in tokens (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"budget {fraction} is not a share of the prompt in (0, 1]")
    return max(1, math.ceil(fraction * prompt_tokens))


def keep_priority(policy: KVPolicy, score: torch.Tensor | None, positions: torch.Tensor,
                  budget: int) -> torch.Tensor:
    """Priority of each cached token (higher is kept first); protected tokens get +inf.

    positions: (B, H, n) original token positions; score: (B, H, n) accumulated scores.
    """
    newest = positions.amax(dim=-1, keepdim=True)
    protected = positions > newest - policy.recent_tokens(budget)
    if policy.sinks:
        protected |= positions < policy.sinks
    base = positions.to(torch.float32) if policy.score == "none" else score
    return torch.where(protected, torch.full_like(base, math.inf), base)


def keep_indices(policy: KVPolicy, score: torch.Tensor | None, positions: torch.Tensor,
                 budget: int) -> torch.Tensor:
    """Slots to keep, (B, H, budget), in slot order."""
    priority = keep_priority(policy, score, positions, budget)
    kept = torch.topk(priority, budget, dim=-1, sorted=False).indices
    return kept.sort(dim=-1).values


def evict_one(policy: KVPolicy, score: torch.Tensor | None, positions: torch.Tensor,
              budget: int) -> torch.Tensor:
    """The one slot per head to evict when the cache holds budget + 1 tokens, (B, H)."""
    return keep_priority(policy, score, positions, budget).argmin(dim=-1)


def score_contribution(policy: KVPolicy, logits: torch.Tensor, temperature: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """What one block of queries adds to each key's score.

    logits: (B, Hkv, groups, q, n) scaled attention logits with masked keys at -inf; the sum
    runs over the query heads that share a KV head and over the queries. H2O adds attention
    probabilities; Keyformer adds softmax((logits + Gumbel noise) / tau).
    """
    logits = logits.float()
    if policy.score == "gumbel":
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
        logits = (logits + gumbel) / temperature
    return torch.softmax(logits, dim=-1).sum(dim=(2, 3))
