"""The simulated machines and model shapes, as frozen dataclasses built from the hw and sim groups.

Times are in nanoseconds and sizes in bytes throughout the simulator; a 1 GHz clock makes one
cycle one nanosecond, but every clock is a parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gemvlab.errors import GemvlabError


@dataclass(frozen=True)
class NPU:
    """Weight-stationary systolic arrays for GEMMs plus vector units for element-wise work."""

    arrays: int = 8
    array_dim: int = 128
    vector_units: int = 8
    vector_lanes: int = 128
    freq_ghz: float = 1.0
    bytes_per_elem: int = 2


@dataclass(frozen=True)
class PIM:
    """HBM2 with a MAC unit per bank; the same memory the NPU reads its weights from.

    Timings are in memory-clock cycles (tck_ns each). ``channel_gbs`` is the bus bandwidth one
    channel gives the NPU; ``access_bytes`` is what one column command reads in one bank.
    """

    channels: int = 32
    banks: int = 32
    page_bytes: int = 1024
    access_bytes: int = 64
    multipliers_per_bank: int = 16
    channel_gbs: float = 32.0
    tck_ns: float = 1.0
    tRCD: int = 14
    tRP: int = 14
    tRAS: int = 34
    tCCD_L: int = 2
    dual_row_buffer: bool = True

    @property
    def bandwidth_gbs(self) -> float:
        """What the NPU (or a plain memory read) sees: every channel's bus."""
        return self.channels * self.channel_gbs


@dataclass(frozen=True)
class GPUSpec:
    """A GPU's datasheet peaks (dense fp16 tensor throughput, HBM bandwidth)."""

    name: str
    tflops: float
    bandwidth_gbs: float


@dataclass(frozen=True)
class LLM:
    """A decoder's shape and how it is split over devices (tensor and pipeline parallel)."""

    name: str
    layers: int
    heads: int
    d_model: int
    d_ff: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.d_model % self.heads or self.heads % self.tp or self.layers % self.pp \
                or self.d_ff % self.tp:
            raise GemvlabError(f"model {self.name}: heads, d_ff must divide by tp and layers by "
                               "pp, and d_model by heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def heads_per_device(self) -> int:
        return self.heads // self.tp

    @property
    def layers_per_stage(self) -> int:
        return self.layers // self.pp


T = TypeVar("T")


def build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """A dataclass from a config mapping; an unknown key is a typo, named with its fix."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise GemvlabError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**dict(values))
