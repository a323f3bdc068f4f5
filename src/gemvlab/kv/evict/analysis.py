"""How concentrated attention is: the share of keys that holds most of each query's mass."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def attention_concentration(probs: torch.Tensor, mass: float, top_shares: Sequence[float],
                            min_query: int) -> dict[str, float]:
    """Means over heads and causal queries q >= min_query of one layer's attention.

    probs: (B, H, n, n) causal attention probabilities. ``keys_for_mass``: the smallest share
    of the q + 1 visible keys whose probabilities sum to at least ``mass``;
    ``mass_top<p>``: the attention mass on the top p share of the visible keys.
    """
    n = probs.shape[-1]
    if not 0 <= min_query < n:
        raise ValueError(f"min_query {min_query} leaves no query among {n}")
    rows = probs[:, :, min_query:].float()                       # (B, H, r, n)
    visible = torch.arange(min_query, n, device=probs.device) + 1  # keys each query sees
    ordered = rows.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    needed = (ordered < mass).sum(dim=-1) + 1                    # keys to reach `mass`
    out = {"keys_for_mass": float((needed / visible).mean())}
    for share in top_shares:
        count = torch.clamp((share * visible).ceil().long(), min=1) - 1
        top = ordered.gather(-1, count.view(1, 1, -1, 1).expand(*ordered.shape[:3], 1))
        out[f"mass_top{round(share * 100)}"] = float(top.mean())
    return out
