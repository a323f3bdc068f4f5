"""Plans that change part of the results leave the rest alone: global overrides reach only the
runs that read their key, a record that leaves the plan is named, a partial plan keeps the
whole CLAIMS.md, and a failed tables job keeps the committed tables (issue 20, items 2-3).

The Snakemake tests run on a copy of the committed results (neupims: simulations of seconds)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf.errors import ConfigAttributeError

from gemvlab.config import REPO_ROOT, experiment_ids, override_root
from gemvlab.errors import GemvlabError
from gemvlab.registry import _RUNNERS, runner
from gemvlab.results.tables import PROVENANCE_COLUMNS
from gemvlab.stage import StageContext, dispatch
from gemvlab.workflow import Workflow

COMMITTED = REPO_ROOT / "results"


def plan_ids(**config: str) -> dict[str, list[str]]:
    wf = Workflow.from_config(config)
    return {exp: [r.run_id for r in plan] for exp, plan in wf.plan.items()}


@pytest.mark.parametrize(("override", "root"), [
    ("eval.lm_eval.limit=50", "eval"), ("model=gemma3-270m", "model"), ("+hw.extra=1", "hw"),
    ("~eval.datasets", "eval"), ("seed=3", "seed"), ("model@bench.model=smollm2-135m", "bench"),
])
def test_override_root_is_the_top_level_key_it_sets(override: str, root: str):
    assert override_root(override) == root


def test_an_override_reaches_only_the_runs_that_read_its_key(tmp_path: Path, capsys):
    base = {"scale": "smoke", "experiments": "neupims,baseline", "results": str(tmp_path)}
    before = plan_ids(**base)
    after = plan_ids(**base, overrides="eval.lm_eval.limit=7")
    # neupims simulates and benchmarks (reads hw, sim, bench); baseline evaluates (reads eval)
    assert after["neupims"] == before["neupims"]
    assert not set(after["baseline"]) & set(before["baseline"])
    err = capsys.readouterr().err
    assert "neupims: " in err and "eval.lm_eval.limit=7" in err and "baseline: " not in err
    # a key neupims reads reaches it, and only it: baseline has no hw
    hw = plan_ids(**base, overrides="hw.pim.channels=8")
    assert not set(hw["neupims"]) & set(before["neupims"]) and hw["baseline"] == before["baseline"]


def test_an_override_of_a_key_no_run_has_is_an_error(tmp_path: Path):
    with pytest.raises(GemvlabError, match="evl.*no planned run has"):
        Workflow.from_config({"scale": "smoke", "experiments": "neupims",
                              "results": str(tmp_path), "overrides": "evl.lm_eval.limit=7"})


def test_a_record_that_leaves_the_plan_is_named(tmp_path: Path, capsys):
    kept = Workflow.from_config({"scale": "smoke", "experiments": "neupims",
                                 "results": str(tmp_path)}).plan["neupims"][0]
    for rid in (kept.run_id, "0123456789"):
        (tmp_path / "runs" / "neupims" / rid).mkdir(parents=True)
        (tmp_path / "runs" / "neupims" / rid / "metrics.json").write_text("{}")
    Workflow.from_config({"scale": "smoke", "experiments": "neupims", "results": str(tmp_path)})
    lines = [x for x in capsys.readouterr().err.splitlines() if "is not in this plan" in x]
    assert len(lines) == 1 and "runs/neupims/0123456789" in lines[0]


def test_a_run_body_sees_only_the_keys_its_runner_declares(tmp_path: Path):
    seen: list[str] = []

    def probe(cfg, ctx):
        seen.append(str(cfg.bench.name))
        return {"model": len(cfg.model.name)}  # undeclared: must fail

    runner("reads_probe", "x", reads=("bench",))(probe)
    try:
        ctx = StageContext("reads_probe", tmp_path, "r", {
            "experiment": {"id": "t"}, "scale": {}, "seed": 1, "bench": {"name": "b"},
            "model": {"name": "m"}}, tracker=None)
        with pytest.raises(ConfigAttributeError, match="model"):
            dispatch("reads_probe")(None, ctx)
        assert seen == ["b"]
    finally:
        del _RUNNERS[("reads_probe", "x")]


# --- Snakemake on a copy of the committed results --------------------------------------------

def snakemake(results: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args, "--config",
           "experiments=neupims", f"results={results}"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".snakemake_timestamp"}


def table_cells(folder: Path) -> dict[str, str]:
    """digest(), with each CSV table replaced by its cells less the commit and lock columns
    (a rerun record is made at today's commit) and its Markdown twin left out."""
    kept = {}
    for name, sha in digest(folder).items():
        if name.endswith(".csv"):
            cells = pd.read_csv(folder / name).drop(columns=list(PROVENANCE_COLUMNS))
            kept[name] = cells.to_csv(index=False)
        elif not name.endswith(".md"):
            kept[name] = sha
    return kept


@pytest.fixture
def committed(tmp_path: Path) -> Path:
    """The committed results, every file with one mtime (now: newer than the experiments'
    own input files), so only what a test changes reruns."""
    results = tmp_path / "results"
    shutil.copytree(COMMITTED, results, ignore=shutil.ignore_patterns("*.log", "report*.html",
                                                                      ".snakemake_timestamp"))
    now = time.time()
    for path in results.rglob("*"):
        os.utime(path, (now, now))
    return results


def test_a_partial_plan_keeps_every_experiments_claims(committed: Path):
    os.utime(committed / "CLAIMS.md", (1.7e9, 1.7e9))  # older than the tables: claims rerun
    proc = snakemake(committed, str(committed / "CLAIMS.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "localrule claims" in proc.stderr  # it did rerun
    claims = (committed / "CLAIMS.md").read_text()
    assert claims == (COMMITTED / "CLAIMS.md").read_text()
    assert all(f"## {exp}" in claims for exp in experiment_ids())


def test_a_failed_tables_job_keeps_the_tables_and_names_the_record(committed: Path):
    run = next(p.parent for p in sorted((committed / "runs" / "neupims").glob("*/metrics.json")))
    (run / "metrics.json").write_text('{"ms_per_token": 1.')  # truncated
    tables = committed / "tables" / "neupims"
    before, cells_before = digest(tables), table_cells(tables)
    proc = snakemake(committed, str(tables), "--forcerun", "tables")
    assert proc.returncode != 0
    assert digest(tables) == before
    log = (committed / "reports" / "tables-neupims.log").read_text()
    assert f"rm {run / 'metrics.json'} && snakemake" in log
    # the command it names remakes the record, then the tables (the default target names
    # every run: Snakemake does not remake a missing input of an existing tables folder)
    (run / "metrics.json").unlink()
    targets = Workflow.from_config({"experiments": "neupims", "results": str(committed)}).targets
    proc = snakemake(committed, *targets[:-1])  # all but the report
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "metrics.json").is_file()
    # the same numbers; only the rerun record's commit and lock cells are today's
    assert table_cells(tables) == cells_before
    locks = {lock for csv in tables.glob("*.csv") for run_id, lock in
             pd.read_csv(csv, usecols=["run_id", "lock"], dtype=str).itertuples(index=False)
             if run_id == run.name}
    assert locks == {"current"}


def test_deleting_one_record_reruns_that_run_only(committed: Path):
    wf = Workflow.from_config({"experiments": "neupims", "results": str(committed)})
    run = next(r for r in wf.plan["neupims"] if r.config["sim"]["task"] == "calibration")
    (committed / "runs" / "neupims" / run.run_id / "metrics.json").unlink()
    others = {exp: digest(committed / "tables" / exp) for exp in experiment_ids()
              if exp != "neupims"}
    proc = snakemake(committed, *wf.targets[:-1])  # all but the report
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [line.split()[-1].rstrip(":") for line in proc.stderr.splitlines()
           if line.startswith(("rule ", "localrule "))]
    assert sorted(ran) == ["claims", "simulate", "tables"], ran
    assert others == {exp: digest(committed / "tables" / exp) for exp in others}
