"""Decode latency and throughput of each KV policy against the full cache, in one process.

Random-weight models of a paper's shape and random prompts: speed does not depend on the
weights. Each (context, batch, policy, budget) prefills the prompt, then times ``steps``
greedy decoding steps after ``warmup`` ones; medians are reported. A setting that runs out
of GPU memory is recorded as such (the full cache runs out first: that is the point).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gemvlab.bench.timing import spread
from gemvlab.kv.evict.generate import generate
from gemvlab.kv.evict.policies import KVPolicy


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _measure(model: torch.nn.Module, ids: torch.Tensor, policy: KVPolicy,
             budget: float | None, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    device = ids.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = generate(model, ids, policy, budget, warmup + steps + 1, seed=seed)
    except torch.OutOfMemoryError as exc:
        return {"oom": 1, "reason": str(exc).splitlines()[0][:200]}
    step, p10, p90 = spread(out.step_s[warmup:])
    return {"oom": 0, "step_ms": step * 1e3, "p10_ms": p10 * 1e3,
            "p90_ms": p90 * 1e3, "tokens_per_s": ids.shape[0] / step,
            "prefill_ms": out.prefill_s * 1e3,
            "total_ms": (out.prefill_s + sum(out.step_s)) * 1e3,
            "kv_mb": out.kv_bytes / 2**20, "kept_tokens": out.kept_tokens,
            "peak_mem_mb": _peak_mb(device)}


def benchmark_kv_decode(model: torch.nn.Module, settings: Sequence[tuple[KVPolicy, float | None,
                                                                           str]],
                        contexts: Sequence[int], batches: Sequence[int], steps: int,
                        warmup: int, seed: int, vocab: int,
                        on_row: Any = None) -> list[dict[str, Any]]:
    """One row per (context, batch, setting): step_ms (median; p10_ms, p90_ms), tokens_per_s,
    prefill_ms, total_ms (prefill + every step), kv_mb (live keys and values), peak_mem_mb
    (CUDA), oom. Every setting first runs once untimed at the smallest shape (kernels,
    allocator), and the order of the settings rotates from one shape to the next, so that no
    policy always runs first."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    small = torch.randint(0, vocab, (min(batches), min(contexts)), generator=gen).to(device)
    for policy, budget, _ in settings:
        _measure(model, small, policy, budget, 2, 1, seed)
    rows: list[dict[str, Any]] = []
    shapes = [(c, b) for c in contexts for b in batches]
    for index, (context, batch) in enumerate(shapes):
        ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
        turn = index % len(settings)
        for policy, budget, label in [*settings[turn:], *settings[:turn]]:
            row = {"policy": policy.name, "budget": label, "context": context, "batch": batch,
                   **_measure(model, ids, policy, budget, steps, warmup, seed)}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def speed_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``speed/<policy>/<budget>/<context>/<batch>/<measure>``; ratios against the full cache
    at the same context and batch (``latency`` = full step / policy step, ``throughput`` =
    policy tokens/s / full tokens/s), and the best tokens/s over batches (``best``)."""
    metrics: dict[str, float] = {}
    ran = {(r["policy"], r["budget"], r["context"], r["batch"]): r for r in rows
           if not r.get("oom")}
    for r in rows:
        key = f"speed/{r['policy']}/{r['budget']}/{r['context']}/{r['batch']}"
        metrics[f"{key}/oom"] = float(r.get("oom", 0))
        for measure in ("step_ms", "p10_ms", "p90_ms", "tokens_per_s", "prefill_ms", "total_ms",
                        "kv_mb", "kept_tokens", "peak_mem_mb"):
            if r.get(measure) is not None:
                metrics[f"{key}/{measure}"] = float(r[measure])
    full = {(c, b): r for (p, _, c, b), r in ran.items() if p == "full"}
    for (policy, label, context, batch), r in ran.items():
        base = full.get((context, batch))
        if policy == "full" or base is None:
            continue
        key = f"ratio/{policy}/{label}/{context}/{batch}"
        metrics[f"{key}/latency"] = base["step_ms"] / r["step_ms"]
        metrics[f"{key}/throughput"] = r["tokens_per_s"] / base["tokens_per_s"]
        metrics[f"{key}/total_latency"] = base["total_ms"] / r["total_ms"]
    best: dict[tuple[str, str, int], float] = {}
    for (policy, label, context, _), r in ran.items():
        k = (policy, label, context)
        best[k] = max(best.get(k, 0.0), r["tokens_per_s"])
    for (policy, label, context), rate in best.items():
        metrics[f"best/{policy}/{label}/{context}/tokens_per_s"] = rate
        if policy != "full" and ("full", "100", context) in best:
            metrics[f"best/{policy}/{label}/{context}/throughput_ratio"] = (
                rate / best["full", "100", context])
    return metrics
