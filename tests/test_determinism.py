"""Same config, same machine, lock and thread count: every untimed metric bit for bit.

Each case runs one run of a stage (or a chain of stages, for the KV codebooks) twice, in fresh
processes side by side on the tiny stand-ins, and compares the two records. The sides differ in
what must not matter: their folders and PYTHONHASHSEED (so an iteration over a set of strings
runs in another order). A metric may differ only where its runner declares it timed
(Runner.timed: clock and memory readings); the tables' ``timed:`` lists must agree with those
declarations, checked here over the committed records.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from gemvlab.config import REPO_ROOT, compose
from gemvlab.registry import Runner, runner_for
from gemvlab.results.tables import Record, build_table, load_record
from tests.tiny_resources import build_resources

SIDES = {"a": "1", "b": "2"}  # side -> PYTHONHASHSEED
TIMEOUT_S = 300

# One run per stage (and per family where a stage serves several), each at its experiment's
# smoke scale and shrunk further where a bench's shapes would take seconds. A case is a chain:
# the KV codebooks are made by two stages before the run that reads them.
CASES: dict[str, list[tuple[str, ...]]] = {
    "evaluate": [("evaluate", "experiment=baseline", "model=gemma3-270m", "eval=standard")],
    "quantize_gptq": [("quantize", "experiment=glvq", "method=gptq", "method.bits=2",
                       "method.calibration.tokens=512")],
    "quantize_glvq": [("quantize", "experiment=glvq", "method=glvq", "method.bits=2",
                       "method.calibration.tokens=512", "method.steps=2",
                       "method.learn_rows=64")],
    # LoRA on an NF4 base at the sweep's high learning rate (a record that drifted on rerun).
    "finetune_qlora": [("finetune", "experiment=oftv2", "method=qlora", "sweep=quantized",
                        "method.lr=0.01")],
    "kv_evict_eval": [("kv_evict_eval", "experiment=keyformer", "eval=kv_summarization")],
    "kvq_chain": [(stage, "experiment=commvq", "eval=kvq_quality")
                  for stage in ("kv_collect", "kv_train", "kv_quant_eval")],
    "simulate": [("simulate", "experiment=neupims", "sim.model=gpt3-7b", "sim.trace=sharegpt",
                  "sim.batches=[32,256]", "sim.iterations=40")],
    "bench_kv": [("bench", "experiment=keyformer", "experiment.stage=bench", "bench=kv_cpu",
                  "bench.contexts=[32]", "bench.steps=2", "bench.warmup=0",
                  "bench.model.shape.num_hidden_layers=2", "bench.model.shape.vocab_size=256")],
    "bench_kvq": [("bench", "experiment=commvq", "experiment.stage=bench", "bench=commvq_cpu",
                   "method=fp32", "bench.contexts=[64]", "bench.repeats=2")],
    "bench_int8": [("bench", "experiment=llm_int8", "experiment.stage=bench", "bench=int8_cpu",
                    "bench.shapes=[[4,128,256]]", "bench.repeats=2", "bench.warmup=0")],
    "bench_lattice": [("bench", "experiment=glvq", "experiment.stage=bench", "bench=glvq_cpu",
                       "bench.shapes=[[1,128,256]]", "bench.bits=[2]", "bench.repeats=2",
                       "bench.warmup=0", "bench.model.shape.num_hidden_layers=1",
                       "bench.model.shape.vocab_size=256", "bench.model.repeats=1",
                       "bench.model.new_tokens=2")],
}


@pytest.fixture(scope="module")
def tiny_resources(tmp_path_factory) -> Path:
    return build_resources(tmp_path_factory.mktemp("determinism") / "resources")


def side_resources(shared: Path, side: Path) -> Path:
    """A resources folder of one side: the shared models and data, but its own KV artifacts
    (kv_collect and kv_train write theirs under paths.resources)."""
    own = side / "resources"
    own.mkdir(parents=True)
    for name in ("models", "data"):
        (own / name).symlink_to(shared / name)
    return own


def stage_command(step: tuple[str, ...], resources: Path, results: Path,
                  run_dir: Path) -> list[str]:
    stage, *overrides = step
    return [sys.executable, "-m", "gemvlab.stages", stage, *overrides, "scale=smoke",
            "logger=none", "threads=1", f"paths.resources={resources}",
            f"paths.results={results}", f"hydra.run.dir={run_dir}"]


def run_sides(steps: list[tuple[str, ...]], shared: Path, tmp: Path) -> dict[str, list[Path]]:
    """Each step on both sides at once (two processes), step after step; the run folders."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    resources = {side: side_resources(shared, tmp / side) for side in SIDES}
    dirs: dict[str, list[Path]] = {side: [] for side in SIDES}
    for i, step in enumerate(steps):
        procs = {}
        for side, hash_seed in SIDES.items():
            run_dir = tmp / side / f"run{i}"
            dirs[side].append(run_dir)
            cmd = stage_command(step, resources[side], tmp / side / "results", run_dir)
            procs[side] = subprocess.Popen(cmd, cwd=REPO_ROOT, text=True,
                                           env={**env, "PYTHONHASHSEED": hash_seed},
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for side, proc in procs.items():
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, f"{step[0]} ({side}):\n{out[-3000:]}"
    return dirs


def same_bits(x: float, y: float) -> bool:
    """Equal as stored: the same float (NaN equals NaN; 0.0 and -0.0 differ)."""
    return float(x).hex() == float(y).hex()


def untimed_differences(a: Mapping[str, float], b: Mapping[str, float],
                        runner: Runner) -> dict[str, tuple]:
    """Metrics of two records of one config that differ but are not timed (and any metric
    only one of them has)."""
    keys = sorted(set(a) | set(b))
    return {k: (a.get(k), b.get(k)) for k in keys
            if k not in a or k not in b
            or (not runner.is_timed(k) and not same_bits(a[k], b[k]))}


def read_run(run_dir: Path) -> tuple[dict, dict[str, float]]:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return config, json.loads((run_dir / "metrics.json").read_text())


def safetensors_under(folder: Path) -> dict[str, bytes]:
    """Every tensor of every .safetensors file under folder, as raw bytes, by relative name."""
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            found[f"{path.relative_to(folder)}:{name}"] = tensor.numpy().tobytes()
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_a_rerun_gives_every_untimed_metric_bit_for_bit(case: str, tiny_resources: Path,
                                                       tmp_path: Path):
    dirs = run_sides(CASES[case], tiny_resources, tmp_path)
    for step, run_a, run_b in zip(CASES[case], dirs["a"], dirs["b"], strict=True):
        config, metrics_a = read_run(run_a)
        _, metrics_b = read_run(run_b)
        runner = runner_for(step[0], config)
        untimed = [k for k in metrics_a if not runner.is_timed(k)]
        assert untimed, f"{step[0]}: every metric is declared timed, so nothing is checked"
        assert untimed_differences(metrics_a, metrics_b, runner) == {}, step
        # What the record says the bits depend on: the vector instructions and the threads.
        prov_a, prov_b = (json.loads((d / "provenance.json").read_text()) for d in (run_a, run_b))
        assert prov_a["cpu_capability"] and prov_a["torch_threads"] == 1
        assert prov_a["cpu_capability"] == prov_b["cpu_capability"]
    # The artifacts too (the KV collected and the codebooks trained from it).
    tensors_a = safetensors_under(tmp_path / "a" / "resources")
    assert tensors_a == safetensors_under(tmp_path / "b" / "resources")
    assert bool(tensors_a) == (case == "kvq_chain")


def test_untimed_differences_ignore_only_declared_timed_metrics():
    runner = Runner("bench", "toy", run=lambda cfg, ctx: {}, timed=("speed/*_ms",))
    a = {"wall_s": 1.0, "speed/x/64/median_ms": 2.0, "ppl": 10.0, "rel_err": float("nan")}
    assert untimed_differences(a, {**a, "wall_s": 3.0, "speed/x/64/median_ms": 5.0},
                               runner) == {}
    assert untimed_differences(a, {**a, "ppl": math.nextafter(10.0, 11.0)}, runner) == {
        "ppl": (10.0, math.nextafter(10.0, 11.0))}
    assert untimed_differences(a, {**a, "extra": 1.0}, runner) == {"extra": (None, 1.0)}
    assert not runner.is_timed("speed_ms") and runner.is_timed("wall_s")


# --- the tables' timed: lists against the runners' declarations --------------------------------

def experiments() -> list[str]:
    return sorted(p.parent.name for p in (REPO_ROOT / "experiments").glob("*/experiment.yaml"))


def table_specs(experiment: str) -> dict[str, dict]:
    cfg = compose([f"experiment={experiment}", "scale=cpu"])
    return OmegaConf.to_container(cfg.experiment.tables, resolve=True)


def marked(record: Record) -> Record:
    """The record with each metric replaced by 1.0 where its runner declares it timed, else
    0.0: a table built from marked records says which of its cells are timed."""
    runner = runner_for(record.config["experiment"]["stage"], record.config)
    return Record(record.run_id, record.config,
                  {k: float(runner.is_timed(k)) for k in record.metrics})


def timed_columns(table: pd.DataFrame, spec: Mapping) -> dict[str, bool]:
    """Each metric column of a table of marked records: True if all its cells are timed,
    False if none are (a mix is a mistake in a runner's declaration)."""
    placeholders = re.findall(r"\{(\w+)\}", spec.get("pattern") or "")[:-1]
    not_metrics = {"run_id", *(spec.get("columns") or {}), *placeholders}
    kinds = {}
    for col in table.columns:
        if col in not_metrics:
            continue
        cells = set(table[col].dropna())
        assert len(cells) <= 1, f"column {col} mixes timed and untimed metrics"
        if cells:
            kinds[col] = cells == {1.0}
    return kinds


@pytest.mark.parametrize("experiment", experiments())
def test_tables_mark_timed_exactly_the_metrics_their_runners_declare_timed(experiment: str):
    runs = REPO_ROOT / "results" / "runs" / experiment
    records = [marked(load_record(d)) for d in sorted(runs.iterdir())
               if (d / "metrics.json").is_file()]
    assert records, f"no committed records of {experiment}"
    for name, spec in table_specs(experiment).items():
        table = build_table(records, spec)
        if table.empty:
            continue
        declared = set(spec.get("timed") or [])
        found = timed_columns(table, spec)
        timed = {col for col, is_timed in found.items() if is_timed}
        assert timed == declared & set(found), (
            f"{experiment} table {name}: its timed: list says {sorted(declared)}, the runners "
            f"declare {sorted(timed)} timed")
