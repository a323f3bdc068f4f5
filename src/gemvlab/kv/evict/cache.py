"""A KV cache that physically shrinks: per layer, preallocated slot buffers of keys, values,
original positions and accumulated scores, holding at most budget (+ one chunk) tokens.

Keys are stored after RoPE, so a kept token keeps its original position; attention over the
slots is order-free and only needs a mask when several queries arrive at once. Evicting one
token per decoding step moves the last slot into the evicted one (a few bytes per head)
instead of copying the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gemvlab.kv.evict.policies import KVPolicy, evict_one, keep_indices


@dataclass
class LayerSlots:
    """One layer's cache: slots [0, n) of each buffer are live."""

    keys: torch.Tensor | None = None       # (B, H, C, D)
    values: torch.Tensor | None = None     # (B, H, C, Dv)
    positions: torch.Tensor | None = None  # (B, H, C) int64
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (B, H, C) float32
    n: int = 0

    def _buffers(self) -> list[torch.Tensor]:
        return [self.keys, self.values, self.positions, *self.scores.values()]

    def _reserve(self, key: torch.Tensor, value: torch.Tensor, capacity: int,
                 kinds: tuple[str, ...]) -> None:
        """(Re)allocate the buffers for ``capacity`` slots, keeping the live ones."""
        b, h, _, d = key.shape
        old = self._buffers() if self.keys is not None else None
        self.keys = key.new_empty(b, h, capacity, d)
        self.values = value.new_empty(b, h, capacity, value.shape[-1])
        self.positions = torch.empty(b, h, capacity, dtype=torch.long, device=key.device)
        self.scores = {k: torch.zeros(b, h, capacity, dtype=torch.float32, device=key.device)
                       for k in kinds}
        if old is not None and self.n:
            for new, prev in zip(self._buffers(), old, strict=True):
                new[:, :, : self.n] = prev[:, :, : self.n]

    def append(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
               capacity: int, kinds: tuple[str, ...]) -> None:
        q = key.shape[2]
        if self.keys is None or self.n + q > self.keys.shape[2]:
            self._reserve(key, value, max(capacity, self.n + q,
                                          0 if self.keys is None else 2 * self.keys.shape[2]),
                          kinds)
        end = self.n + q
        self.keys[:, :, self.n:end] = key
        self.values[:, :, self.n:end] = value
        self.positions[:, :, self.n:end] = positions
        for buf in self.scores.values():
            buf[:, :, self.n:end] = 0.0
        self.n = end

    def shrink(self, capacity: int) -> None:
        """Free the slots past ``capacity`` once eviction has emptied them (after a prompt)."""
        if self.keys is not None and self.keys.shape[2] > capacity >= self.n:
            self._reserve(self.keys, self.values, capacity, tuple(self.scores))

    def copy(self, capacity: int, kinds: tuple[str, ...]) -> LayerSlots:
        """A copy with room for ``capacity`` slots, keeping only the score kinds named."""
        out = LayerSlots(self.keys, self.values, self.positions,
                         {kind: self.scores[kind] for kind in kinds}, self.n)
        out._reserve(self.keys, self.values, max(capacity, self.n), kinds)
        return out

    def live(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.keys[:, :, : self.n], self.values[:, :, : self.n],
                self.positions[:, :, : self.n])

    def keep(self, index: torch.Tensor) -> None:
        """Keep the slots ``index`` (B, H, m), compacted into slots [0, m)."""
        m = index.shape[-1]
        for buf in (self.keys, self.values):
            picked = buf[:, :, : self.n].gather(
                2, index.unsqueeze(-1).expand(*index.shape, buf.shape[-1]))
            buf[:, :, :m] = picked
        for buf in (self.positions, *self.scores.values()):
            buf[:, :, :m] = buf[:, :, : self.n].gather(2, index)
        self.n = m

    def drop(self, slot: torch.Tensor) -> None:
        """Evict one slot per head (B, H): the last live slot moves into it."""
        last = self.n - 1
        idx = slot.view(*slot.shape, 1)
        for buf in (self.keys, self.values):
            src = buf[:, :, last:last + 1].clone()
            buf.scatter_(2, idx.unsqueeze(-1).expand(*idx.shape, buf.shape[-1]), src)
        for buf in (self.positions, *self.scores.values()):
            buf.scatter_(2, idx, buf[:, :, last:last + 1].clone())
        self.n = last

    def nbytes(self) -> int:
        """Bytes of the live keys and values (what attention reads)."""
        if self.keys is None:
            return 0
        per_slot = (self.keys.shape[-1] * self.keys.element_size()
                    + self.values.shape[-1] * self.values.element_size())
        return self.keys.shape[0] * self.keys.shape[1] * self.n * per_slot


@dataclass
class KVCache:
    """All layers' slots, the policy and budget, and the decoding-step clock for Keyformer.

    budget None keeps every token (the full cache). ``capacity`` is the slot count to
    preallocate per layer (budget + the largest block of new tokens, or the whole sequence).
    ``scorers`` are the policies whose scores accumulate: the evicting policy's own, or
    several while a shared prompt is prefilled once for many policies (see ``fork``).
    """

    policy: KVPolicy
    budget: int | None
    capacity: int
    total_steps: int = 0
    seed: int = 0
    step: int = 0
    layers: dict[int, LayerSlots] = field(default_factory=dict)
    query_positions: torch.Tensor | None = None
    scorers: tuple[KVPolicy, ...] | None = None
    _generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget {self.budget} must keep at least one token")
        if self.scorers is None:
            self.scorers = (self.policy,) if self.scoring else ()
        kinds = [p.score for p in self.scorers]
        if len(set(kinds)) != len(kinds) or "none" in kinds:
            raise ValueError(f"scorers need distinct score kinds, got {kinds}")

    @property
    def score_kinds(self) -> tuple[str, ...]:
        return tuple(p.score for p in self.scorers)

    @property
    def evicting(self) -> bool:
        return self.policy.evicts and self.budget is not None

    @property
    def scoring(self) -> bool:
        return self.evicting and self.policy.needs_scores

    def fork(self, policy: KVPolicy, budget: int | None, capacity: int, total_steps: int,
             seed: int) -> KVCache:
        """A cache for ``policy`` that starts from this one's prompt, evicted to its budget."""
        out = KVCache(policy, budget, capacity, total_steps, seed)
        missing = set(out.score_kinds) - set(self.score_kinds)
        if missing:
            raise ValueError(f"the shared prompt was not scored for {sorted(missing)}")
        if self._generator is not None and "gumbel" in out.score_kinds:
            # the fork's noise continues this cache's stream, as an unforked run's would
            out._generator = torch.Generator(device=self._generator.device)
            out._generator.set_state(self._generator.get_state())
        out.layers = {i: s.copy(capacity, out.score_kinds) for i, s in self.layers.items()}
        for idx in out.layers:
            out.evict_layer(idx)
        return out

    def layer(self, idx: int) -> LayerSlots:
        if idx not in self.layers:
            self.layers[idx] = LayerSlots()
        return self.layers[idx]

    def generator(self, device: torch.device) -> torch.Generator | None:
        """Seeded noise for Keyformer's Gumbel scores, on the device that uses it."""
        if "gumbel" not in self.score_kinds:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def temperature(self, scorer: KVPolicy) -> float:
        return scorer.temperature(self.step, self.total_steps)

    def evict_layer(self, idx: int) -> None:
        """Shrink one layer to the budget once its attention has scored the new tokens.

        Called inside each layer's attention, so a long prompt's full keys and values live
        for one layer at a time, not for the whole model.
        """
        slots = self.layers[idx]
        if not self.evicting or slots.n <= self.budget:
            return
        if self.step > 0 and not self.policy.decode_evicts:
            return
        kind = self.policy.score
        scores = slots.scores[kind][:, :, : slots.n] if kind in slots.scores else None
        positions = slots.positions[:, :, : slots.n]
        if slots.n == self.budget + 1:
            slots.drop(evict_one(self.policy, scores, positions, self.budget))
        else:
            slots.keep(keep_indices(self.policy, scores, positions, self.budget))
            slots.shrink(self.capacity)

    def tokens(self) -> int:
        """Tokens held per layer and head (the largest over layers)."""
        return max((s.n for s in self.layers.values()), default=0)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers.values())
