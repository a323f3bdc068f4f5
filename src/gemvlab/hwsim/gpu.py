"""The GPU-only baseline: a roofline with fitted efficiencies, calibrated on measured kernels.

A GEMM takes max(flops / (peak * e_compute), bytes / (bandwidth * e_memory)) plus a fixed
per-kernel overhead; decode attention (bandwidth-bound GEMVs over the KV cache) takes
bytes / (bandwidth * e_attention) plus its own overhead. The four numbers are fitted to
timings of a real GPU (bench kind decode_ops) and carried to the simulated GPU's datasheet.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gemvlab.errors import GemvlabError
from gemvlab.hwsim.hardware import GPUSpec

_KEY = re.compile(r"gpu/(?P<op>[^/]+)/b(?P<batch>\d+)/median_us")


@dataclass(frozen=True)
class GPUModel:
    spec: GPUSpec
    e_compute: float
    e_memory: float
    e_attention: float
    overhead_ns: float
    attention_overhead_ns: float

    def gemm_ns(self, flops: np.ndarray | float, nbytes: np.ndarray | float) -> np.ndarray:
        compute = np.asarray(flops) / (self.spec.tflops * 1e3 * self.e_compute)
        memory = np.asarray(nbytes) / (self.spec.bandwidth_gbs * self.e_memory)
        return np.maximum(compute, memory) + self.overhead_ns

    def attention_ns(self, nbytes: np.ndarray | float) -> np.ndarray:
        return np.asarray(nbytes) / (self.spec.bandwidth_gbs * self.e_attention) \
            + self.attention_overhead_ns

    def on(self, spec: GPUSpec) -> GPUModel:
        """The same efficiencies and overheads on another GPU's datasheet."""
        return GPUModel(spec, self.e_compute, self.e_memory, self.e_attention, self.overhead_ns,
                        self.attention_overhead_ns)


@dataclass(frozen=True)
class Measurement:
    op: str
    batch: int
    flops: float
    nbytes: float
    ns: float

    @property
    def is_attention(self) -> bool:
        return self.op.startswith("attn")


def measurements(metrics: Mapping[str, float]) -> list[Measurement]:
    """The timed kernels of a decode_ops benchmark record (OOM-skipped ones have no time)."""
    found = []
    for key, value in metrics.items():
        match = _KEY.fullmatch(key)
        if match is None:
            continue
        base = f"gpu/{match['op']}/b{match['batch']}"
        found.append(Measurement(match["op"], int(match["batch"]), float(metrics[f"{base}/flops"]),
                                 float(metrics[f"{base}/bytes"]), float(value) * 1e3))
    if not found:
        raise GemvlabError("the GPU measurements hold no gpu/<op>/b<batch>/median_us keys: "
                           "point hw.gpu.measurements at a bench=neupims_gpu run's metrics.json")
    return sorted(found, key=lambda m: (m.op, m.batch))


def split(found: list[Measurement]) -> tuple[list[Measurement], list[Measurement]]:
    """Fit on every other batch size of each op, hold out the rest (interpolation check)."""
    fit, held = [], []
    for _, group in itertools.groupby(found, key=lambda m: m.op):
        for i, m in enumerate(group):
            (fit if i % 2 == 0 else held).append(m)
    return fit, held


def fit(spec: GPUSpec, found: list[Measurement]) -> GPUModel:
    """Least squares in log time: a grid over the GEMM efficiencies and overhead, then a
    linear fit of attention time on bytes (its slope is the achieved bandwidth)."""
    gemms = [m for m in found if not m.is_attention]
    attn = [m for m in found if m.is_attention]
    if not gemms or len(attn) < 2:
        raise GemvlabError("calibration needs GEMM timings and at least two attention timings")
    flops = np.array([m.flops for m in gemms])
    nbytes = np.array([m.nbytes for m in gemms])
    ns = np.array([m.ns for m in gemms])
    eff = np.linspace(0.05, 1.0, 96)
    over = np.linspace(0.0, float(ns.min()), 41)
    best = (np.inf, 1.0, 1.0, 0.0)
    compute = flops[None, :] / (spec.tflops * 1e3 * eff[:, None])
    memory = nbytes[None, :] / (spec.bandwidth_gbs * eff[:, None])
    for o in over:
        pred = np.maximum(compute[:, None, :], memory[None, :, :]) + o
        err = np.mean(np.log(pred / ns) ** 2, axis=-1)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        if err[i, j] < best[0]:
            best = (float(err[i, j]), float(eff[i]), float(eff[j]), float(o))
    a_bytes = np.array([m.nbytes for m in attn])
    a_ns = np.array([m.ns for m in attn])
    slope, intercept = np.polyfit(a_bytes, a_ns, 1, w=1 / a_ns)
    if slope <= 0:
        raise GemvlabError("attention timings do not grow with bytes: recheck the measurements")
    e_attention = 1.0 / (slope * spec.bandwidth_gbs)
    return GPUModel(spec, best[1], best[2], e_attention, best[3], max(float(intercept), 0.0))


def predict(model: GPUModel, m: Measurement) -> float:
    if m.is_attention:
        return float(model.attention_ns(m.nbytes))
    return float(model.gemm_ns(m.flops, m.nbytes))


def calibration_metrics(model: GPUModel, fit_set: list[Measurement],
                        held: list[Measurement]) -> dict[str, float]:
    """Measured against predicted time per kernel, and the error summaries per split."""
    metrics: dict[str, float] = {}
    errors: dict[str, list[float]] = {"fit": [], "heldout": []}
    for name, group in (("fit", fit_set), ("heldout", held)):
        for m in group:
            pred = predict(model, m)
            rel = pred / m.ns - 1.0
            base = f"calibration/{m.op}/b{m.batch}"
            metrics.update({f"{base}/measured_us": m.ns / 1e3, f"{base}/predicted_us": pred / 1e3,
                            f"{base}/rel_err": rel, f"{base}/heldout": float(name == "heldout"),
                            f"{base}/batch": float(m.batch)})
            errors[name].append(abs(rel))
    for name, values in errors.items():
        if values:
            metrics[f"calibration_summary/{name}/median_abs_rel_err"] = float(np.median(values))
            metrics[f"calibration_summary/{name}/max_abs_rel_err"] = float(np.max(values))
            metrics[f"calibration_summary/{name}/kernels"] = float(len(values))
    metrics.update({"calibration_fit/e_compute": model.e_compute,
                    "calibration_fit/e_memory": model.e_memory,
                    "calibration_fit/e_attention": model.e_attention,
                    "calibration_fit/overhead_us": model.overhead_ns / 1e3,
                    "calibration_fit/attention_overhead_us": model.attention_overhead_ns / 1e3})
    return metrics
