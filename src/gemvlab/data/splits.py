"""Fixed, seeded, non-overlapping document splits, shared by every dataset we build."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from gemvlab.errors import GemvlabError


def assign_split(doc_id: str, fractions: Mapping[str, float], seed: int) -> str:
    """A document's split depends only on its id and the seed, never on the others."""
    total = sum(fractions.values())
    if not fractions or abs(total - 1.0) > 1e-9 or min(fractions.values()) < 0:
        raise GemvlabError(f"split fractions {dict(fractions)} must be >= 0 and sum to 1 "
                           "(for example data.splits={train:0.8,calibration:0.1,test:0.1})")
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, share in fractions.items():
        edge += share
        if u < edge:
            return name
    return list(fractions)[-1]


def split_documents(doc_ids: Sequence[str], fractions: Mapping[str, float],
                    seed: int) -> dict[str, list[str]]:
    if len(set(doc_ids)) != len(doc_ids):
        raise GemvlabError("document ids must be unique to split by document")
    out: dict[str, list[str]] = {name: [] for name in fractions}
    for doc_id in doc_ids:
        out[assign_split(doc_id, fractions, seed)].append(doc_id)
    return out
