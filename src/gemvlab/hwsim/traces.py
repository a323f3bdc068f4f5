"""Request traces: input and output lengths drawn from a workload's length distributions.

Lengths are log-normal with the configured means (so a trace matches its source's published
averages) and spreads, rounded, clipped to [min, max], and the output cut so that input plus
output fit the model's context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gemvlab.errors import GemvlabError


@dataclass(frozen=True)
class Requests:
    inputs: np.ndarray
    outputs: np.ndarray

    def __len__(self) -> int:
        return int(self.inputs.size)


def _lengths(rng: np.random.Generator, spec: Mapping[str, Any], n: int, what: str) -> np.ndarray:
    mean, sigma = float(spec["mean"]), float(spec["sigma"])
    lo, hi = int(spec["min"]), int(spec["max"])
    if mean <= 0 or sigma < 0 or not 1 <= lo <= hi:
        raise GemvlabError(f"trace {what}: need mean > 0, sigma >= 0 and 1 <= min <= max")
    mu = np.log(mean) - sigma**2 / 2  # E[exp(N(mu, sigma^2))] = mean
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int64)


def sample(trace: Mapping[str, Any], n: int, seed: int, max_context: int) -> Requests:
    """n requests of a trace, the same for a seed whatever the batch or system."""
    if n < 1:
        raise GemvlabError("a trace needs at least one request")
    rng = np.random.default_rng(seed)
    inputs = np.minimum(_lengths(rng, trace["input"], n, "input"), max_context - 1)
    outputs = _lengths(rng, trace["output"], n, "output")
    return Requests(inputs, np.maximum(np.minimum(outputs, max_context - inputs), 1))


def requests_needed(batch: int, iterations: int, mean_output: float) -> int:
    """Enough requests to keep the batch full for the iterations, with a 2x margin."""
    return batch + int(2 * iterations * batch / max(mean_output, 1.0)) + 1
