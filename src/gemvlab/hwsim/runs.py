"""Runner of stage simulate: NeuPIMs' batched-decode simulation (gemvlab.hwsim), one task per
run.

``sim.task=throughput``: every system of ``sim.systems`` at every batch of ``sim.batches`` over
one trace; metrics ``throughput/<system>/b<batch>/{tokens_per_s,iteration_us,batch,
iterations,tokens,completed}``, ``util/<system>/b<batch>/{npu_busy,pim_busy,overlap,batch}``
and ``speedup/<baseline>/b<batch>/{neupims_over,batch}``.
``sim.task=calibration``: the GPU model fitted on the measured kernels
(``calibration/<op>/b<batch>/...``, ``calibration_summary/<split>/...``,
``calibration_fit/...``). ``sim.task=speed``: the simulator's own wall time
(``simspeed/<system>/{wall_s,iterations_per_s}``, medians over repeats).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gemvlab.config import REPO_ROOT, to_plain
from gemvlab.errors import GemvlabError
from gemvlab.hwsim import gpu, traces
from gemvlab.hwsim.hardware import LLM, NPU, PIM, GPUSpec, build
from gemvlab.hwsim.simulator import SYSTEMS, Machine, SimResult, simulate
from gemvlab.registry import runner
from gemvlab.stage import StageContext

_TASKS = ("throughput", "calibration", "speed")


def load_measurements(path: str) -> dict[str, float]:
    """The measured GPU kernels: a bench=neupims_gpu run's metrics.json."""
    full = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    try:
        return json.loads(full.read_text())
    except FileNotFoundError:
        raise GemvlabError(f"GPU measurements {full} do not exist: run bench=neupims_gpu on a "
                           "GPU and set hw.gpu.measurements to its metrics.json") from None
    except (OSError, json.JSONDecodeError) as err:
        raise GemvlabError(f"GPU measurements {full} are not readable JSON ({err})") from err


def calibrated_gpu(hw: Mapping[str, Any]) -> tuple[gpu.GPUModel, list[gpu.Measurement],
                                                   list[gpu.Measurement]]:
    """The GPU model fitted on the fit split of the measured GPU's kernels."""
    measured = build(GPUSpec, hw["gpu"]["measured"], "hw.gpu.measured")
    fit_set, held = gpu.split(gpu.measurements(load_measurements(hw["gpu"]["measurements"])))
    return gpu.fit(measured, fit_set), fit_set, held


def llm_of(sim: Mapping[str, Any], name: str) -> LLM:
    if name not in sim["models"]:
        raise GemvlabError(f"sim model {name!r} is unknown: use one of {sorted(sim['models'])}")
    return build(LLM, {"name": name, **sim["models"][name]}, f"sim.models.{name}")


def machine_of(hw: Mapping[str, Any], sim: Mapping[str, Any], with_gpu: bool) -> Machine:
    model = None
    if with_gpu:
        model = calibrated_gpu(hw)[0].on(build(GPUSpec, hw["gpu"]["simulated"],
                                               "hw.gpu.simulated"))
    return Machine(build(NPU, hw["npu"], "hw.npu"), build(PIM, hw["pim"], "hw.pim"), model,
                   bool(sim["interleave"]))


def trace_requests(sim: Mapping[str, Any], batch: int, iterations: int,
                   seed: int) -> traces.Requests:
    name = sim["trace"]
    if name not in sim["traces"]:
        raise GemvlabError(f"sim.trace={name!r} is unknown: use one of {sorted(sim['traces'])}")
    spec = sim["traces"][name]
    n = traces.requests_needed(batch, iterations, float(spec["output"]["mean"]))
    return traces.sample(spec, n, seed, int(sim["max_context"]))


def _result_metrics(r: SimResult) -> dict[str, float]:
    base = f"b{r.batch}"
    tput = f"throughput/{r.system}/{base}"
    metrics = {f"{tput}/tokens_per_s": r.tokens_per_s,
               f"{tput}/iteration_us": r.time_ns / max(r.iterations, 1) / 1e3,
               f"{tput}/batch": float(r.batch),
               f"{tput}/iterations": float(r.iterations),
               f"{tput}/tokens": float(r.tokens),
               f"{tput}/completed": float(r.completed)}
    if r.system != "gpu":  # the GPU model has no NPU or PIM to be busy
        time_ns = r.time_ns or 1.0
        metrics.update({f"util/{r.system}/{base}/npu_busy": r.npu_busy_ns / time_ns,
                        f"util/{r.system}/{base}/pim_busy": r.pim_busy_ns / time_ns,
                        f"util/{r.system}/{base}/overlap": r.overlap_ns / time_ns,
                        f"util/{r.system}/{base}/batch": float(r.batch)})
    return metrics


def throughput_metrics(hw: Mapping[str, Any], sim: Mapping[str, Any],
                       seed: int) -> dict[str, float]:
    from tqdm.auto import tqdm

    systems, batches = list(sim["systems"]), [int(b) for b in sim["batches"]]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise GemvlabError(f"sim.systems has unknown system(s) {unknown}: use {list(SYSTEMS)}")
    llm, machine = llm_of(sim, sim["model"]), machine_of(hw, sim, "gpu" in systems)
    iterations = int(sim["iterations"])
    # One request list for every batch and system: they all decode the same trace.
    requests = trace_requests(sim, max(batches), iterations, seed)
    metrics: dict[str, float] = {}
    bar = tqdm(total=len(systems) * len(batches), desc=f"simulate {llm.name} {sim['trace']}",
               unit="sim")
    for batch in batches:
        rates = {}
        for system in systems:
            result = simulate(system, machine, llm, requests, batch, iterations)
            metrics.update(_result_metrics(result))
            rates[system] = result.tokens_per_s
            bar.update()
        if "neupims" in rates:
            for baseline in (s for s in systems if s != "neupims"):
                metrics[f"speedup/{baseline}/b{batch}/neupims_over"] = \
                    rates["neupims"] / rates[baseline]
                metrics[f"speedup/{baseline}/b{batch}/batch"] = float(batch)
    bar.close()
    return metrics


def calibration_metrics(hw: Mapping[str, Any]) -> dict[str, float]:
    return gpu.calibration_metrics(*calibrated_gpu(hw))


def speed_metrics(hw: Mapping[str, Any], sim: Mapping[str, Any], seed: int) -> dict[str, float]:
    """Wall time to simulate sim.speed's model, batch and iterations, per system."""
    spec = sim["speed"]
    llm, machine = llm_of(sim, spec["model"]), machine_of(hw, sim, "gpu" in sim["systems"])
    batch, iterations = int(spec["batch"]), int(spec["iterations"])
    requests = trace_requests(sim, batch, iterations, seed)
    metrics: dict[str, float] = {}
    for system in sim["systems"]:
        walls = []
        for _ in range(int(spec["repeats"])):
            t0 = time.perf_counter()
            result = simulate(system, machine, llm, requests, batch, iterations)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        metrics[f"simspeed/{system}/wall_s"] = wall
        metrics[f"simspeed/{system}/iterations"] = float(result.iterations)
        metrics[f"simspeed/{system}/iterations_per_s"] = result.iterations / wall
    return metrics


def measurements_file(plain: Mapping[str, Any]) -> list[str]:
    """The GPU kernel timings the GPU model is fitted on: an input of every simulation."""
    return [plain["hw"]["gpu"]["measurements"]]


@runner("simulate", "npu_pim", uses_model=False, inputs=measurements_file,
        needs_gpu=lambda _plain: False, reads=("hw", "sim"),
        timed=("simspeed/*/wall_s", "simspeed/*/iterations_per_s"))
def run_simulate(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """One simulation task (throughput, calibration or the simulator's own speed)."""
    if "sim" not in cfg or "hw" not in cfg:
        raise GemvlabError("simulate needs the hw and sim groups: run it with experiment=neupims "
                           "(or add hw=neupims sim=neupims)")
    plain = to_plain(cfg)
    hw, sim = plain["hw"], plain["sim"]
    task = sim["task"]
    if task == "throughput":
        return throughput_metrics(hw, sim, int(cfg.seed))
    if task == "calibration":
        return calibration_metrics(hw)
    if task == "speed":
        return speed_metrics(hw, sim, int(cfg.seed))
    raise GemvlabError(f"sim.task={task} is unknown: use one of {', '.join(_TASKS)}")

