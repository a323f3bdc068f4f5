"""Continuous-batching decode over a request trace, on four systems.

- ``gpu``: every operator on a GPU (the calibrated roofline of gemvlab.hwsim.gpu).
- ``npu``: every operator on the NPU; attention GEMVs stream the KV cache over the bus.
- ``npu_pim``: GEMMs on the NPU, attention GEMVs in PIM, blocked: the memory serves the NPU
  or the PIM at a time, so their work never overlaps.
- ``neupims``: the same split with dual row buffers (``pim.dual_row_buffer``: NPU reads and
  PIM commands proceed together) and sub-batch interleaving (``interleave``: two sub-batches
  so one's GEMMs on the NPU overlap the other's GEMVs in PIM).

One iteration makes one token for every active request; a finished request leaves and the
next one of the trace takes its slot (its prompt's KV is assumed prefilled). Tensor parallel
devices each hold 1/tp of every layer; a pipeline stage holds layers/pp layers. ``batch`` is
what one stage processes per step: with pp stages, pp such batches are in flight, so the
model makes ``batch`` tokens per stage time, and an iteration here is one stage's step.
Inter-device transfers (all-reduce, stage hand-offs) are not modelled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gemvlab.errors import GemvlabError
from gemvlab.hwsim import costs
from gemvlab.hwsim.gpu import GPUModel
from gemvlab.hwsim.hardware import LLM, NPU, PIM
from gemvlab.hwsim.schedule import ARRAYS, VECTOR, schedule
from gemvlab.hwsim.schedule import PIM as IN_PIM
from gemvlab.hwsim.traces import Requests

SYSTEMS = ("gpu", "npu", "npu_pim", "neupims")
# Vector-unit operations per element: layer norm (mean, variance, normalise, scale, shift),
# GELU (tanh form), residual add, softmax (max, subtract, exp, sum, divide).
_LAYERNORM_OPS, _GELU_OPS, _RESIDUAL_OPS, _SOFTMAX_OPS = 5, 8, 1, 5
# GPU element-wise kernels per layer (two layer norms, GELU, two residual adds).
_GPU_ELEMENTWISE = 5


@dataclass(frozen=True)
class Machine:
    npu: NPU
    pim: PIM
    gpu: GPUModel | None
    interleave: bool = True


@dataclass(frozen=True)
class Step:
    """One iteration's time and how long each unit was busy in it."""

    ns: float
    npu_ns: float
    pim_ns: float
    overlap_ns: float


@dataclass(frozen=True)
class SimResult:
    system: str
    batch: int
    iterations: int
    tokens: int
    time_ns: float
    npu_busy_ns: float
    pim_busy_ns: float
    overlap_ns: float
    produced: np.ndarray
    completed: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / (self.time_ns * 1e-9) if self.time_ns else 0.0


def linear_shapes(llm: LLM) -> list[tuple[int, int]]:
    """(K, N) of a layer's four GEMMs on one tensor-parallel device (Megatron's split): QKV and
    FFN up by columns, out-projection and FFN down by rows."""
    d, f, tp = llm.d_model, llm.d_ff, llm.tp
    return [(d, 3 * d // tp), (d // tp, d), (d, f // tp), (f // tp, d)]


@functools.lru_cache(maxsize=4096)
def _gemms_ns(npu: NPU, mem_gbs: float, llm: LLM, m: int) -> tuple[float, float, float, float]:
    """A layer's four GEMMs for m rows on one device: QKV, out-projection, FFN up, FFN down."""
    qkv, proj, up, down = (costs.gemm_ns(npu, mem_gbs, m, k, n) for k, n in linear_shapes(llm))
    return qkv, proj, up, down


def layer_tasks(system: str, machine: Machine, llm: LLM, contexts: np.ndarray,
                slots: np.ndarray) -> list[tuple[int, float]]:
    """One layer of one (sub-)batch as (unit, ns) tasks in dependency order."""
    npu, pim = machine.npu, machine.pim
    m, d, heads, dh = int(contexts.size), llm.d_model, llm.heads_per_device, llm.head_dim
    qkv, proj, up, down = _gemms_ns(npu, pim.bandwidth_gbs, llm, m)
    norm = costs.vector_ns(npu, m * d, _LAYERNORM_OPS)
    residual = costs.vector_ns(npu, m * d, _RESIDUAL_OPS)
    gelu = costs.vector_ns(npu, m * llm.d_ff // llm.tp, _GELU_OPS)
    softmax = costs.vector_ns(npu, float(contexts.sum()) * heads, _SOFTMAX_OPS)
    if system == "npu":
        # The NPU streams the KV cache over the memory bus, as its GEMMs stream weights.
        kv_bytes = float(contexts.sum()) * heads * dh * npu.bytes_per_elem
        unit, gemv = ARRAYS, costs.npu_gemv_ns(npu, pim.bandwidth_gbs, kv_bytes)
    else:
        unit = IN_PIM
        gemv = costs.pim_attention_ns(pim, contexts, heads, dh, npu.bytes_per_elem, slots)
    return [(VECTOR, norm), (ARRAYS, qkv), (unit, gemv), (VECTOR, softmax), (unit, gemv),
            (ARRAYS, proj), (VECTOR, residual + norm), (ARRAYS, up), (VECTOR, gelu),
            (ARRAYS, down), (VECTOR, residual)]


def gpu_layer_ns(gpu: GPUModel, llm: LLM, contexts: np.ndarray) -> float:
    """One layer of a batch on the GPU (fp16): four GEMMs, attention, element-wise kernels."""
    m, d, tp, b = int(contexts.size), llm.d_model, llm.tp, 2
    gemm = sum(float(gpu.gemm_ns(*costs.gemm_cost(m, k, n, b))) for k, n in linear_shapes(llm))
    kv_bytes = 2 * float(contexts.sum()) * (d // tp) * b + 2 * m * (d // tp) * b
    elementwise = _GPU_ELEMENTWISE * float(gpu.gemm_ns(0.0, 2 * m * d * b))
    return gemm + float(gpu.attention_ns(kv_bytes)) + elementwise


def _sub_batches(contexts: np.ndarray, parts: int) -> list[np.ndarray]:
    """Indices of ``parts`` sub-batches with balanced KV: longest first, dealt in turn."""
    order = np.argsort(-contexts, kind="stable")
    return [order[i::parts] for i in range(parts) if order[i::parts].size]


def step(system: str, machine: Machine, llm: LLM, contexts: np.ndarray,
         slots: np.ndarray) -> Step:
    """One pipeline stage's decode step for the active requests (KV lengths, batch slots)."""
    layers = llm.layers_per_stage
    if system == "gpu":
        if machine.gpu is None:
            raise GemvlabError("system gpu needs a calibrated GPU model (hw.gpu)")
        return Step(layers * gpu_layer_ns(machine.gpu, llm, contexts), 0.0, 0.0, 0.0)
    parts = 2 if system == "neupims" and machine.interleave and contexts.size >= 2 else 1
    chains = [layer_tasks(system, machine, llm, contexts[i], slots[i]) * layers
              for i in _sub_batches(contexts, parts)]
    sched = schedule(chains, concurrent=system == "neupims" and machine.pim.dual_row_buffer)
    return Step(sched.makespan_ns, sched.npu_busy_ns, sched.pim_busy_ns, sched.overlap_ns)


def simulate(system: str, machine: Machine, llm: LLM, requests: Requests, batch: int,
             iterations: int, on_iteration: Callable[[], None] | None = None) -> SimResult:
    """Decode a trace with at most ``batch`` requests in flight for ``iterations`` steps (or
    until the trace is done); every request's tokens are counted as they are made."""
    if system not in SYSTEMS:
        raise GemvlabError(f"unknown system {system!r}: use one of {', '.join(SYSTEMS)}")
    if batch < 1 or iterations < 1:
        raise GemvlabError("batch and iterations must be >= 1")
    owner = np.full(batch, -1, dtype=np.int64)
    kv = np.zeros(batch, dtype=np.int64)
    left = np.zeros(batch, dtype=np.int64)
    produced = np.zeros(len(requests), dtype=np.int64)
    queued = 0
    time_ns = npu_ns = pim_ns = overlap = 0.0
    tokens = done_iterations = completed = 0
    for _ in range(iterations):
        free = np.flatnonzero(owner < 0)[: len(requests) - queued]
        if free.size:
            new = np.arange(queued, queued + free.size)
            owner[free], kv[free], left[free] = new, requests.inputs[new], requests.outputs[new]
            queued += free.size
        active = np.flatnonzero(owner >= 0)
        if not active.size:
            break
        # The new token's own key and value join the cache before attention.
        cost = step(system, machine, llm, kv[active] + 1, active)
        time_ns += cost.ns
        npu_ns += cost.npu_ns
        pim_ns += cost.pim_ns
        overlap += cost.overlap_ns
        produced[owner[active]] += 1
        tokens += int(active.size)
        kv[active] += 1
        left[active] -= 1
        finished = active[left[active] == 0]
        completed += int(finished.size)
        owner[finished] = -1
        done_iterations += 1
        if on_iteration is not None:
            on_iteration()
    return SimResult(system, batch, done_iterations, tokens, time_ns, npu_ns, pim_ns, overlap,
                     produced, completed)
