"""The Snakemake workflow: its plan, dry run and lint (smoke runs: tests/experiments/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from gemvlab.config import REPO_ROOT, compose, experiment_ids, plan_experiment, run_id, to_plain
from gemvlab.workflow import Workflow

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_every_experiment_and_group_option_composes():
    for exp in experiment_ids():
        assert plan_experiment(exp)
    for group in ("model", "data", "eval", "scale", "logger", "method", "analysis", "bench", "hw",
                  "sim"):
        for option in sorted([*(REPO_ROOT / "conf" / group).glob("*.yaml"),
                              *(REPO_ROOT / "experiments").glob(f"*/conf/{group}/*.yaml")]):
            extra = ["model.path=/x"] if option.stem == "local" else []
            if group in ("method", "analysis", "bench"):  # groups an experiment brings in
                extra.append("experiment=llm_int8")
            if group in ("hw", "sim"):
                extra.append("experiment=neupims")
            cfg = to_plain(compose([f"{group}={option.stem}", *extra]))
            assert cfg[group]


def test_run_ids_follow_the_config_not_the_bookkeeping():
    base = to_plain(compose([]))
    assert run_id(base, "evaluate") == run_id(to_plain(compose(["logger=none", "threads=1",
                                                               "paths.results=/tmp/x"])),
                                              "evaluate")
    assert run_id(base, "evaluate") != run_id(base, "tables")
    changed = to_plain(compose(["eval.perplexity.context_length=256"]))
    assert run_id(base, "evaluate") != run_id(changed, "evaluate")


def test_baseline_plan_evaluates_both_models_and_reruns_one():
    runs = plan_experiment("baseline", ["scale=smoke"])
    pairs = sorted((r.config["model"]["name"], r.config["eval"]["name"]) for r in runs)
    assert pairs == [("gemma3-270m", "standard"), ("smollm2-135m", "perplexity"),
                     ("smollm2-135m", "standard")]
    assert len({r.run_id for r in runs}) == 3


def test_workflow_routes_results_by_scale():
    assert Workflow.from_config({"scale": "smoke", "experiments": "baseline"}).results == \
        "results/smoke"
    assert Workflow.from_config({"experiments": "baseline"}).results == "results"


def test_dry_run_shows_the_whole_chain(tmp_path: Path):
    proc = snakemake("-n", "--config", f"resources={tmp_path}/res", f"results={tmp_path}/out",
                     "scale=smoke")
    assert proc.returncode == 0, proc.stderr
    stats = proc.stdout[proc.stdout.index("Job stats"):]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", stats, flags=re.M))
    # llm_int8: 18 quantize runs and the CPU benchmark; its GPU benchmark is left out on a
    # machine without CUDA when no record of it exists. glvq at smoke: RTN, GPTQ, GLVQ once.
    # oftv2 at smoke: LoRA, OFTv2 and QOFT, two steps each. keyformer: one kv_eval run per
    # task (summarization, CoQA, perplexity, attention mass, kvpress peer) and the CPU decode
    # benchmark; its GPU benchmark is left out like llm_int8's. commvq: KV collected and
    # codebooks trained once, one kvq_eval run per task (quality, passkey, MSE), its CPU
    # decode benchmark. neupims: four simulations (throughput, an ablation, the GPU model's
    # calibration on the committed H200 timings, the simulator's speed); its GPU benchmark has a
    # record at scale cpu only.
    assert counts == {"fetch_model": "2", "fetch_data": "2", "evaluate": "3", "quantize": "21",
                      "finetune": "3", "kv_eval": "5", "kv_collect": "1", "kv_train": "1",
                      "kvq_eval": "3", "simulate": "4", "bench": "3", "tables": "7",
                      "claims": "1", "report": "1", "all": "1", "total": "58"}


def test_lint_passes():
    proc = snakemake("--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hub_models_are_planned_only_online(tmp_path: Path):
    """At gpu scale llm_int8 adds OPT from the hub; offline (the default) they stay out."""
    common = {"scale": "gpu", "experiments": "llm_int8", "results": str(tmp_path)}

    def models(wf: Workflow) -> set[str]:
        return {r.config["model"]["name"] for r in wf.plan["llm_int8"]}

    offline = models(Workflow.from_config(common))
    online = models(Workflow.from_config({**common, "overrides": "hub_online=true"}))
    assert offline == {"smollm2-135m", "gemma3-270m"}
    assert online == offline | {"facebook--opt-125m", "facebook--opt-1.3b", "facebook--opt-6.7b"}


def test_every_rule_declares_its_resources():
    """threads, mem_mb and runtime on every rule but `all`, so a cluster job asks for them."""
    text = "\n".join(p.read_text() for p in sorted((REPO_ROOT / "rules").glob("*.smk")))
    rules = re.split(r"^\s*rule:?\s*\w*:?\s*$", text, flags=re.M)[1:]
    # fetch_model, fetch_data, the run stages, the artifact stages, tables, claims, report
    assert len(rules) == 7
    for body in rules:
        assert "threads:" in body and "mem_mb=" in body and "runtime=" in body, body[:200]


def test_run_resources_follow_the_config():
    """Memory from the experiment, a GPU for CUDA benchmarks and for model stages at gpu scale."""
    cpu = Workflow.from_config({"experiments": "llm_int8,neupims"})
    gpu = Workflow.from_config({"scale": "gpu", "experiments": "llm_int8,neupims"})

    def wildcards(wf: Workflow, exp: str, stage: str, **match) -> SimpleNamespace:
        run = next(r for r in wf.plan[exp] if r.stage == stage
                   and all(r.config["bench"].get(k) == v for k, v in match.items()))
        return SimpleNamespace(experiment=exp, run_id=run.run_id)

    quantize = wildcards(cpu, "llm_int8", "quantize")
    assert cpu.run_mem_mb(quantize) == compose(["experiment=llm_int8"]).experiment.job_mem_mb
    assert cpu.run_gpus(quantize) == 0
    assert gpu.run_gpus(wildcards(gpu, "llm_int8", "quantize")) == 1
    assert gpu.run_gpus(wildcards(gpu, "neupims", "simulate")) == 0
    # Committed H200 records keep the CUDA benchmarks in the cpu plan: they ask for a GPU.
    assert cpu.run_gpus(wildcards(cpu, "llm_int8", "bench", device="cuda")) == 1
    assert cpu.run_gpus(wildcards(cpu, "llm_int8", "bench", device="cpu")) == 0
    assert cpu.run_runtime(quantize) > 0
