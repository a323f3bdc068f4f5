"""The clocks and statistics every benchmark uses, so that their times mean the same thing.

Two clocks: ``Stopwatch``, the host's wall time of a block with the device synchronised on
both sides (device work and launch overhead included), and ``device_times_us``, per-call device
time from CUDA events after an L2 flush (launch overhead excluded; perf_counter on the CPU).
Every benchmark reports the median with p10 and p90 of ``spread``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import torch
from torch import Tensor

# Fallback L2 size when the device does not report one (H100: 50 MB).
_DEFAULT_L2_BYTES = 64 * 2**20
# GPU spin before each timed call (about 1 ms at 2 GHz): longer than an impl's host launch
# work, so the timed region holds device work only.
_HEAD_START_CYCLES = 2_000_000


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock reading includes it (CPU: no-op)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """``with Stopwatch(device) as watch: ...`` then ``watch.seconds``: wall time of the block,
    the device synchronised on entry and exit so queued work is neither inherited nor lost."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def l2_flush_buffer(dev: torch.device) -> Tensor | None:
    """A buffer of 4x the L2 size whose read evicts the weights between timed iterations
    (None off CUDA); made once per benchmark and passed to ``device_times_us``."""
    if dev.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or _DEFAULT_L2_BYTES
    return torch.ones(4 * l2 // 4, dtype=torch.float32, device=dev)


def device_times_us(fn: Callable[[], Tensor], dev: torch.device, warmup: int, repeats: int,
                    flush: Tensor | None) -> tuple[list[float], list[float] | None]:
    """Per-call device times in microseconds over ``repeats`` calls after ``warmup`` untimed
    ones, and on CUDA per-call eager latencies (None on the CPU).

    Device time: CUDA events around each call, after an L2 flush by a read (a write would
    leave dirty lines to write back inside the timed region) and a spin kernel that keeps the
    GPU busy while the host queues the call, so launch overhead is not counted (a host sync
    inside the call still is). Eager latency: host clock from an idle GPU with a flushed L2 to
    the call's end, launch overhead included. CPU: perf_counter only.
    """
    for _ in range(warmup):
        fn()
    if dev.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return times, None
    assert flush is not None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(dev)
    for start, end in zip(starts, ends, strict=True):
        flush.sum()
        torch.cuda._sleep(_HEAD_START_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(dev)
    device = [start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends, strict=True)]
    eager = []
    for _ in range(repeats):
        flush.sum()
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        eager.append((time.perf_counter() - t0) * 1e6)
    return device, eager


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default rule) without numpy."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p10, p90) of a benchmark's times, in their unit."""
    return statistics.median(times), quantile(times, 0.1), quantile(times, 0.9)


def check_bench_args(impls: Sequence[str], known: Sequence[str], warmup: int,
                     repeats: int) -> None:
    """The checks every benchmark makes before timing anything."""
    unknown = sorted(set(impls) - set(known))
    if unknown:
        raise ValueError(f"unknown impls {unknown}; choose from {list(known)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
