"""The NeuPIMs simulator: cost models against hand-computed cases, schedules, conservation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from gemvlab.config import compose
from gemvlab.errors import GemvlabError
from gemvlab.hwsim import costs, gpu, traces
from gemvlab.hwsim.hardware import LLM, NPU, PIM, GPUSpec
from gemvlab.hwsim.runs import run_simulate
from gemvlab.hwsim.schedule import ARRAYS, VECTOR, schedule
from gemvlab.hwsim.schedule import PIM as IN_PIM
from gemvlab.hwsim.simulator import SYSTEMS, Machine, simulate
from gemvlab.stage import execute

TINY = LLM("tiny", layers=2, heads=4, d_model=256, d_ff=1024, tp=1, pp=1)
SPEC = GPUSpec("test-gpu", tflops=100.0, bandwidth_gbs=1000.0)
TRUE_GPU = gpu.GPUModel(SPEC, e_compute=0.6, e_memory=0.8, e_attention=0.7, overhead_ns=4000.0,
                        attention_overhead_ns=6000.0)


def test_gemm_that_fits_one_array_tile():
    # 64 x 128 @ 128 x 128: one tile on one array, max(64, 128) cycles plus a 2 x 128 fill and
    # drain; the bus moves (64*128 + 128*128 + 64*128) * 2 bytes = 64 KiB in 64 ns.
    assert costs.gemm_ns(NPU(), 1024.0, 64, 128, 128) == pytest.approx(384.0)
    # One token through a 4096 x 4096 layer streams 32 MiB of weights: bandwidth-bound.
    expected = (4096 + 4096 * 4096 + 4096) * 2 / 1024.0
    assert costs.gemm_ns(NPU(), 1024.0, 1, 4096, 4096) == pytest.approx(expected)
    # 1024 tiles on 8 arrays, 128 rounds of 512 cycles: compute-bound at m = 512.
    assert costs.gemm_ns(NPU(), 1024.0, 512, 4096, 4096) == pytest.approx(128 * 512 + 256)


def test_gemv_over_one_bank_row():
    pim = PIM()
    # 1 KiB row, 64-byte columns (32 fp16 values, 16 multipliers: 2 cycles = tCCD_L):
    # tRCD 14 + 16 columns x 2 = 46 > tRAS 34, then tRP 14.
    assert costs.bank_row_ns(pim) == pytest.approx(60.0)
    assert costs.pim_gemv_ns(pim, np.array([1024.0]), np.array([0.0]))[0] == pytest.approx(60.0)
    # Eight multipliers take 4 cycles per column: 14 + 64 + 14.
    assert costs.bank_row_ns(dataclasses.replace(pim, multipliers_per_bank=8)) == \
        pytest.approx(92.0)
    # One byte more than a row in every bank needs a second round.
    full = pim.banks * pim.page_bytes
    assert costs.pim_gemv_ns(pim, np.array([full, full + 1.0]), np.zeros(2)).tolist() == \
        pytest.approx([60.0, 120.0])


def test_pim_attention_takes_the_slowest_channel():
    pim = PIM(channels=2)
    # Head dim 128, 4 keys: 1 KiB, one row; writing q and reading 4 scores moves 264 bytes.
    one = 60.0 + (4 + 128) * 2 / pim.channel_gbs
    ctx = np.array([4, 4, 4])
    # Three requests of one head on two channels: slots 0 and 2 share channel 0.
    assert costs.pim_attention_ns(pim, ctx, 1, 128, 2, np.array([0, 1, 2])) == \
        pytest.approx(2 * one)
    assert costs.pim_attention_ns(pim, ctx[:2], 1, 128, 2, np.array([0, 1])) == pytest.approx(one)


def test_blocked_mode_never_overlaps_npu_and_pim_and_dual_buffer_does():
    rng = np.random.default_rng(0)
    units = (ARRAYS, IN_PIM, VECTOR)
    chains = [[(units[rng.integers(3)], float(rng.uniform(1, 10))) for _ in range(30)]
              for _ in range(2)]
    blocked, dual = schedule(chains, concurrent=False), schedule(chains, concurrent=True)
    assert blocked.overlap_ns == 0.0
    for a0, a1 in blocked.intervals[ARRAYS]:
        for p0, p1 in blocked.intervals[IN_PIM]:
            assert a1 <= p0 or p1 <= a0
    assert dual.overlap_ns > 0
    assert dual.makespan_ns <= blocked.makespan_ns
    work = sum(ns for chain in chains for _, ns in chain)
    assert sum(blocked.busy_ns) == pytest.approx(work) == pytest.approx(sum(dual.busy_ns))
    # By hand: two chains of (arrays 10, PIM 10) pipeline into 30 ns, or 40 ns blocked.
    pair = [[(ARRAYS, 10.0), (IN_PIM, 10.0)]] * 2
    assert schedule(pair, concurrent=True).makespan_ns == 30.0
    assert schedule(pair, concurrent=False).makespan_ns == 40.0


def _machine(**pim: object) -> Machine:
    return Machine(NPU(), PIM(**pim), TRUE_GPU, interleave=True)


def _requests(n: int = 40, seed: int = 0) -> traces.Requests:
    spec = {"input": {"mean": 30, "sigma": 0.8, "min": 2, "max": 256},
            "output": {"mean": 12, "sigma": 0.8, "min": 1, "max": 64}}
    return traces.sample(spec, n, seed, max_context=128)


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_token_is_produced_exactly_once(system: str):
    requests = _requests()
    result = simulate(system, _machine(), TINY, requests, batch=8, iterations=10_000)
    assert result.produced.tolist() == requests.outputs.tolist()
    assert result.tokens == int(requests.outputs.sum())
    assert result.completed == len(requests)
    assert result.time_ns > 0
    # A cap stops early and never over-produces.
    capped = simulate(system, _machine(), TINY, requests, batch=8, iterations=5)
    assert capped.iterations == 5 and (capped.produced <= requests.outputs).all()
    assert capped.tokens == int(capped.produced.sum()) == 5 * 8


def test_systems_differ_only_where_they_should():
    requests = _requests(64)
    naive = simulate("npu_pim", _machine(), TINY, requests, 16, 200)
    assert naive.overlap_ns == 0.0
    full = simulate("neupims", _machine(), TINY, requests, 16, 200)
    assert full.overlap_ns > 0
    # NeuPIMs without its two features is the blocked system, to the nanosecond.
    stripped = Machine(NPU(), PIM(dual_row_buffer=False), TRUE_GPU, interleave=False)
    same = simulate("neupims", stripped, TINY, requests, 16, 200)
    assert same.time_ns == pytest.approx(naive.time_ns)
    # The NPU streams the KV cache over its bus; PIM reads it inside the banks.
    npu = simulate("npu", _machine(), TINY, requests, 16, 200)
    assert npu.pim_busy_ns == 0.0 and npu.time_ns > naive.time_ns
    with pytest.raises(GemvlabError, match="unknown system"):
        simulate("tpu", _machine(), TINY, requests, 16, 10)


def _synthetic_measurements(model: gpu.GPUModel) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for batch in (1, 4, 16, 64, 256, 1024):
        for op, (k, n) in {"qkv": (1024, 3072), "ffn1": (1024, 4096)}.items():
            flops, nbytes = 2 * batch * k * n, (batch * k + k * n + batch * n) * 2
            metrics.update({f"gpu/{op}/b{batch}/median_us": float(model.gemm_ns(flops, nbytes))
                            / 1e3, f"gpu/{op}/b{batch}/flops": flops,
                            f"gpu/{op}/b{batch}/bytes": nbytes})
        nbytes = 2 * batch * 16 * 512 * 64 * 2
        metrics.update({f"gpu/attn_c512/b{batch}/median_us":
                        float(model.attention_ns(nbytes)) / 1e3,
                        f"gpu/attn_c512/b{batch}/flops": 4 * batch * 16 * 512 * 64,
                        f"gpu/attn_c512/b{batch}/bytes": nbytes})
    return metrics


def test_gpu_fit_recovers_a_known_model():
    fit_set, held = gpu.split(gpu.measurements(_synthetic_measurements(TRUE_GPU)))
    assert len(fit_set) == len(held) == 9
    model = gpu.fit(SPEC, fit_set)
    assert model.e_attention == pytest.approx(0.7, rel=1e-3)
    assert model.attention_overhead_ns == pytest.approx(6000.0, rel=1e-3)
    summary = gpu.calibration_metrics(model, fit_set, held)
    assert summary["calibration_summary/heldout/max_abs_rel_err"] < 0.03
    # A model that is off is reported off.
    wrong = dataclasses.replace(model, e_memory=model.e_memory / 2)
    off = gpu.calibration_metrics(wrong, fit_set, held)
    assert off["calibration_summary/heldout/max_abs_rel_err"] > 0.3
    with pytest.raises(GemvlabError, match="median_us"):
        gpu.measurements({"x": 1.0})


def test_traces_match_their_means_and_fit_the_context():
    spec = {"input": {"mean": 161.31, "sigma": 1.0, "min": 2, "max": 100_000},
            "output": {"mean": 337.99, "sigma": 0.9, "min": 1, "max": 100_000}}
    a = traces.sample(spec, 20_000, 3, max_context=1_000_000)
    assert a.inputs.mean() == pytest.approx(161.31, rel=0.05)
    assert a.outputs.mean() == pytest.approx(337.99, rel=0.05)
    b = traces.sample(spec, 20_000, 3, max_context=1024)
    assert (b.inputs + b.outputs <= 1024).all() and (b.outputs >= 1).all()
    assert traces.sample(spec, 50, 3, 1024).inputs.tolist() == b.inputs[:50].tolist()
    assert traces.sample(spec, 50, 4, 1024).inputs.tolist() != b.inputs[:50].tolist()


def _cfg(tmp_path: Path, *overrides: str):
    data = tmp_path / "kernels.json"
    data.write_text(json.dumps(_synthetic_measurements(TRUE_GPU)))
    return compose(["experiment=neupims", "scale=smoke", "logger=none",
                    f"paths.results={tmp_path}", f"hw.gpu.measurements={data}", *overrides])


def test_simulate_stage_writes_each_task(tmp_path: Path):
    cfg = _cfg(tmp_path, "sim.model=gpt3-7b", "sim.batches=[4,32]", "sim.iterations=5")
    m = execute("simulate", run_simulate, cfg, tmp_path / "tput")
    for system in SYSTEMS:
        assert m[f"throughput/{system}/b32/tokens"] == 5 * 32
    assert m["speedup/npu/b32/neupims_over"] == pytest.approx(
        m["throughput/neupims/b32/tokens_per_s"] / m["throughput/npu/b32/tokens_per_s"])
    saved = json.loads((tmp_path / "tput" / "metrics.json").read_text())
    assert saved["throughput/gpu/b4/tokens_per_s"] == m["throughput/gpu/b4/tokens_per_s"]
    cal = execute("simulate", run_simulate, _cfg(tmp_path, "sim.task=calibration"),
                  tmp_path / "cal")
    assert cal["calibration_summary/heldout/kernels"] == 9
    speed = execute("simulate", run_simulate,
                    _cfg(tmp_path, "sim.task=speed", "sim.speed.iterations=3",
                         "sim.speed.repeats=1", "sim.systems=[neupims]"), tmp_path / "speed")
    assert speed["simspeed/neupims/iterations"] == 3


def test_simulate_stage_rejects_bad_input_clearly(tmp_path: Path):
    with pytest.raises(GemvlabError, match="unknown"):
        execute("simulate", run_simulate, _cfg(tmp_path, "sim.model=gpt3-1t"), tmp_path / "a")
    with pytest.raises(GemvlabError, match="sim.systems"):
        execute("simulate", run_simulate, _cfg(tmp_path, "sim.systems=[tpu]"), tmp_path / "b")
    missing = compose(["experiment=neupims", "scale=smoke", "logger=none",
                       f"paths.results={tmp_path}", f"hw.gpu.measurements={tmp_path}/none.json"])
    with pytest.raises(GemvlabError, match="bench=neupims_gpu"):
        execute("simulate", run_simulate, missing, tmp_path / "c")
    with pytest.raises(GemvlabError, match="unknown key"):
        execute("simulate", run_simulate, _cfg(tmp_path, "+hw.pim.bankz=3"), tmp_path / "d")


def test_committed_gpu_timings_are_the_gpu_run_record():
    """The calibration data is a copy of a bench=neupims_gpu record that names its GPU."""
    from gemvlab.config import REPO_ROOT
    from gemvlab.results.tables import load_record

    data = json.loads((REPO_ROOT / "experiments" / "neupims" / "gpu_kernels.json").read_text())
    runs = [load_record(p.parent) for p in
            (REPO_ROOT / "results" / "runs" / "neupims").glob("*/metrics.json")]
    gpu_runs = [r for r in runs if r.config.get("bench", {}).get("name") == "neupims_gpu"]
    assert [r.metrics for r in gpu_runs] == [data]
    prov = json.loads((REPO_ROOT / "results" / "runs" / "neupims" / gpu_runs[0].run_id /
                       "provenance.json").read_text())
    assert "H200" in prov["gpu"]["name"]
