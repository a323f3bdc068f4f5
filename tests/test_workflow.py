"""The Snakemake workflow: its plan, dry run and lint (smoke runs: tests/experiments/)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from gemvlab.config import (
    REPO_ROOT,
    compose,
    experiment_ids,
    plan_experiment,
    run_id,
    scale_names,
    to_plain,
)
from gemvlab.manifest import MANIFEST
from gemvlab.registry import runner_for
from gemvlab.workflow import Workflow

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("scale", sorted(scale_names()))
def test_every_experiment_plans_at_every_scale(scale: str):
    """Every run composes, has a run_id of its own and a runner that serves it."""
    for exp in experiment_ids():
        runs = plan_experiment(exp, [f"scale={scale}"])
        assert runs and len({r.run_id for r in runs}) == len(runs), exp
        for run in runs:
            assert runner_for(run.stage, run.config).stage == run.stage


def test_every_group_option_composes():
    """Every option of every group: those in conf/ with an experiment whose defaults pull the
    group in (or alone), those an experiment folder brings with that experiment."""
    base = set(to_plain(compose([])))
    keys = {exp: set(to_plain(compose([f"experiment={exp}"]))) for exp in experiment_ids()}

    def brought_by(group: str) -> list[str]:  # conf/ groups an experiment's defaults pull in
        return [] if group in base else [next(f"experiment={e}" for e in keys if group in keys[e])]

    options = [(brought_by(p.parent.name), p) for p in (REPO_ROOT / "conf").glob("*/*.yaml")]
    options += [([f"experiment={p.parents[2].name}"], p)
                for p in (REPO_ROOT / "experiments").glob("*/conf/*/*.yaml")]
    for extra, option in sorted(options, key=lambda o: str(o[1])):
        group = option.parent.name
        if option.stem == "local":
            extra = [*extra, "model.path=/x"]
        assert to_plain(compose([f"{group}={option.stem}", *extra]))[group], option


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
    """Every planned run, artifact (CommVQ's KV collection and codebooks) and fetch, one tables
    job per experiment, claims and the report: Snakemake's DAG is the Workflow's plan."""
    cfg = {"resources": f"{tmp_path}/res", "results": f"{tmp_path}/out", "scale": "smoke"}
    proc = snakemake("-n", "--config", *(f"{k}={v}" for k, v in cfg.items()))
    assert proc.returncode == 0, proc.stderr
    stats = proc.stdout[proc.stdout.index("Job stats"):]
    counts = {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", stats, flags=re.M)}

    wf = Workflow.from_config(cfg)
    assert set(wf.plan) == set(experiment_ids()) and all(wf.plan.values())
    runs = [r for plan in wf.plan.values() for r in plan]
    needs = {p for r in runs for p in wf.inputs_of(r, None)}
    needs |= {p for art, r in wf.artifacts.values() for p in wf.inputs_of(r, art.stage)}
    expected = Counter(r.stage for r in runs) + Counter(a.stage for a, _ in wf.artifacts.values())
    for kind, stage in (("models", "fetch_model"), ("data", "fetch_data")):
        expected[stage] = len({p for p in needs if Path(p).parent.parent.name == kind
                               and Path(p).name == MANIFEST})
    expected.update(tables=len(wf.experiments), claims=1, report=1, all=1)
    assert counts == {**expected, "total": sum(expected.values())}


# Every rule runs the interpreter of the environment that scripts/setup.sh installs from
# requirements.lock (Workflow.python), so a per-rule conda env would never be used: the one lint
# that asks for it is expected.
EXPECTED_LINTS = {"Specify a conda environment or container for each rule."}


def test_lint_passes():
    proc = snakemake("--lint")
    out = proc.stdout + proc.stderr
    lints = set(re.findall(r"^\s+\* (.+?):?$", out, flags=re.M))
    assert lints <= EXPECTED_LINTS, out
    assert proc.returncode == 0 or lints, out


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
    # fetch_model, fetch_data, the run stages, the artifact stages, tables, claims, report,
    # drift, verify_report
    assert len(rules) == 9
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


def test_fetch_params_do_not_depend_on_the_planned_experiments():
    """glvq takes the default model, llm_int8 names it: the same fetch either way, or Snakemake
    refetches the model (params changed) each time the other experiment is run."""
    model = SimpleNamespace(model="smollm2-135m")
    args = {exp: Workflow.from_config({"scale": "smoke", "experiments": exp}).model_args(model)
            for exp in ("glvq", "llm_int8")}
    assert args["glvq"] == args["llm_int8"] == "model=smollm2-135m"
