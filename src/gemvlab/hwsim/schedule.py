"""List scheduling of dependent tasks on the NPU's arrays, its vector units and PIM.

A chain is one (sub-)batch's tasks in dependency order, each on one unit. Blocked mode (PIM
without a second row buffer) lets the memory serve either the NPU (weights streaming into
the arrays) or the PIM at a time, so array and PIM tasks exclude each other; with dual row
buffers they overlap. The vector units work from on-chip buffers and are never blocked. The
scheduler is greedy: the next task is the chain head that can start earliest (ties: the
lower chain).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ARRAYS, PIM, VECTOR = 0, 1, 2
_UNITS = 3


@dataclass(frozen=True)
class Schedule:
    makespan_ns: float
    busy_ns: tuple[float, float, float]
    overlap_ns: float
    intervals: tuple[tuple[tuple[float, float], ...], ...]

    @property
    def npu_busy_ns(self) -> float:
        return self.busy_ns[ARRAYS]

    @property
    def pim_busy_ns(self) -> float:
        return self.busy_ns[PIM]


def _intersection(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Total length where two sorted lists of disjoint intervals overlap."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def schedule(chains: Sequence[Sequence[tuple[int, float]]], concurrent: bool) -> Schedule:
    """Run the chains' (unit, ns) tasks, each after its predecessor and one task per unit at a
    time; with ``concurrent`` false the arrays and PIM also exclude each other."""
    free = [0.0] * _UNITS
    ready = [0.0] * len(chains)
    head = [0] * len(chains)
    intervals: list[list[tuple[float, float]]] = [[] for _ in range(_UNITS)]
    busy = [0.0] * _UNITS
    remaining = sum(len(c) for c in chains)
    while remaining:
        best, best_start = -1, float("inf")
        for c, chain in enumerate(chains):
            if head[c] < len(chain):
                unit = chain[head[c]][0]
                gate = free[unit]
                if not concurrent and unit != VECTOR:
                    gate = max(free[ARRAYS], free[PIM])
                start = max(ready[c], gate)
                if start < best_start:
                    best, best_start = c, start
        unit, ns = chains[best][head[best]]
        end = best_start + ns
        if ns > 0:
            intervals[unit].append((best_start, end))
        busy[unit] += ns
        free[unit] = end
        ready[best] = end
        head[best] += 1
        remaining -= 1
    return Schedule(max(ready, default=0.0), (busy[0], busy[1], busy[2]),
                    _intersection(intervals[ARRAYS], intervals[PIM]),
                    tuple(tuple(i) for i in intervals))
