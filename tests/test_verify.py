"""`snakemake verify`: the plan's runs again into a folder of their own, by the same run rules,
then a drift table per experiment (issue 21, item 4). The comparison itself: tests/test_drift.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from gemvlab.config import REPO_ROOT
from gemvlab.errors import GemvlabError
from gemvlab.workflow import Workflow

COMMITTED = REPO_ROOT / "results"
SUMMARY = re.compile(r"^gemvlab verify: neupims: (\d+) cells compared, (\d+) drifting", re.M)


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_verify_is_never_part_of_the_default_target(tmp_path: Path):
    wf = Workflow.from_config({"scale": "smoke", "experiments": "neupims",
                               "results": str(tmp_path)})
    assert wf.verify_results == f"{tmp_path}/verify"
    assert not [t for t in wf.targets if "/verify/" in t or "/drift/" in t]
    assert any("/verify/runs/neupims/" in t for t in wf.verify_targets)
    assert f"{tmp_path}/drift/neupims.csv" in wf.verify_targets


def test_verify_results_may_not_be_the_results_folder(tmp_path: Path):
    with pytest.raises(GemvlabError, match="verify_results=.*that is the results folder"):
        Workflow.from_config({"experiments": "neupims", "results": str(tmp_path),
                              "verify_results": f"{tmp_path}/."})


def test_a_rerun_writes_into_verify_and_a_record_keeps_its_params(tmp_path: Path):
    """The run rules serve both folders; for the results folder their params are what they
    were, so adding verify reruns no committed record."""
    wf = Workflow.from_config({"scale": "smoke", "experiments": "neupims",
                               "results": str(tmp_path)})
    run = wf.plan["neupims"][0]
    own = SimpleNamespace(results=str(tmp_path), experiment="neupims", run_id=run.run_id)
    rerun = SimpleNamespace(**{**vars(own), "results": wf.verify_results})
    assert wf.run_args(own) == " ".join(shlex.quote(o) for o in run.overrides)
    assert f"paths.results={wf.verify_results}" in shlex.split(wf.run_args(rerun))
    assert wf.run_dir(rerun) == f"{wf.verify_results}/runs/neupims/{run.run_id}"
    assert re.fullmatch(wf.results_folders, wf.verify_results)


@pytest.fixture
def no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine every committed record is rerun")


def test_the_drift_stage_lists_a_gpu_record_as_not_rerun(tmp_path: Path, no_cuda):
    """neupims' committed plan holds an H200 record: a CPU machine reruns the simulations, not
    it. The stage on copies of the committed records (as if rerun) finds no drift."""
    for folder in ("results", "fresh"):
        shutil.copytree(COMMITTED / "runs" / "neupims", tmp_path / folder / "runs" / "neupims")
    wf = Workflow.from_config({"experiments": "neupims", "results": f"{tmp_path}/results",
                               "verify_results": f"{tmp_path}/fresh"})
    gpu = [r.run_id for r in wf.plan["neupims"] if r.config["bench"].get("device") == "cuda"]
    assert gpu and wf.not_rerun == {("neupims", rid): "needs CUDA" for rid in gpu}
    assert len(wf.fresh_records("neupims")) == len(wf.plan["neupims"]) - len(gpu)
    args = wf.drift_args(SimpleNamespace(experiment="neupims"))
    proc = subprocess.run([sys.executable, "-m", "gemvlab.stages.drift", "experiment=neupims",
                           *shlex.split(wf.common_args), *shlex.split(args), "logger=none",
                           f"hydra.run.dir={tmp_path}/record"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "drift" / "neupims.csv")
    assert set(table.loc[table["run_id"].isin(gpu), "status"]) == {"not rerun (needs CUDA)"}
    assert set(table.loc[~table["run_id"].isin(gpu), "status"]) == {"same"}
    summary = (tmp_path / "results" / "drift" / "neupims.md").read_text().splitlines()[2]
    assert re.fullmatch(rf"neupims: \d+ cells compared, 0 drifting, 0 within tolerance, max "
                        rf"rel diff 0; runs not rerun: {len(gpu)} \(needs CUDA\)", summary)


def test_snakemake_verify_finds_no_drift_then_a_tampered_metric(tmp_path: Path):
    """neupims' smoke records made, then verified: its simulations are deterministic, so no
    untimed cell drifts though the simulator's wall times do; then one committed metric is
    changed by hand, and verify names that cell and fails (the fresh records are reused)."""
    results = tmp_path / "results"
    cfg = {"scale": "smoke", "experiments": "neupims", "results": str(results),
           "resources": str(tmp_path / "resources"), "overrides": "logger=none"}
    config = ["--config", *(f"{k}={v}" for k, v in cfg.items())]
    wf = Workflow.from_config(cfg)
    made = snakemake(*[t for t in wf.targets if t.endswith("metrics.json")], *config)
    assert made.returncode == 0, made.stderr[-3000:]

    first = snakemake("verify", *config)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"^simulate\s+4$", first.stdout + first.stderr, re.M)
    cells, drifting = map(int, SUMMARY.search(first.stderr).groups())
    table = pd.read_csv(results / "drift" / "neupims.csv")
    assert cells == len(table) > 100 and drifting == 0 and set(table["status"]) == {"same"}
    speed = next(r.run_id for r in wf.plan["neupims"] if r.config["sim"]["task"] == "speed")
    old, new = (json.loads((folder / "runs" / "neupims" / speed / "metrics.json").read_text())
                for folder in (results, results / "verify"))
    assert any(old[k] != new[k] for k in old if k.endswith("/wall_s"))  # timed: not compared
    report = (results / "report-verify-neupims.html").read_text()
    assert '"drift"' in report and "neupims.csv" in report

    throughput = next(r.run_id for r in wf.plan["neupims"]
                      if r.config["sim"]["task"] == "throughput"
                      and r.config["sim"]["study"] == "main")
    record = results / "runs" / "neupims" / throughput / "metrics.json"
    metrics = json.loads(record.read_text())
    key = next(k for k in metrics if k.startswith("throughput/") and k.endswith("/tokens_per_s"))
    metrics[key] *= 1.5
    record.write_text(json.dumps(metrics))
    again = snakemake("verify", *config)
    assert again.returncode != 0, again.stderr[-3000:]  # a drift fails verify, after its tables
    assert f"gemvlab verify: neupims: 1 of {cells} cells drift: see " \
           f"{results}/drift/neupims.md" in again.stderr
    assert not re.search(r"^simulate\s", again.stdout + again.stderr, re.M)  # fresh ones reused
    assert SUMMARY.search(again.stderr).groups() == (str(cells), "1")
    table = pd.read_csv(results / "drift" / "neupims.csv")
    drift = table[table["status"] != "same"]
    _, system, batch, column = key.split("/")
    assert drift[["table", "run_id", "row", "column", "status"]].values.tolist() == \
        [["throughput", throughput, f"system={system} b={batch}", column, "drift"]]
    assert drift["rel_diff"].iloc[0] == pytest.approx(1 / 3)
    assert f"| {throughput} | system={system} b={batch} | {column} |" in \
        (results / "drift" / "neupims.md").read_text()
