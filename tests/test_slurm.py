"""The smoke-scale workflow through a real Slurm cluster gives the tables of a local run.

A one-node cluster (tests/slurm_cluster.py) runs the jobs that `snakemake --profile
profiles/slurm` submits through snakemake-executor-plugin-slurm. Runs in CI (`.ci/run` sets
CI=true) and on demand (`GEMVLAB_SLURM=1 pytest tests/test_slurm.py`); it needs root, to install
Debian's slurm-wlm and munge when missing and to write /etc/slurm/slurm.conf.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from gemvlab.config import REPO_ROOT, compose, plan_experiment
from gemvlab.results.tables import untimed
from tests.slurm_cluster import SlurmCluster, install_packages

# The experiment that needs no model fetch (its whole smoke chain takes a minute locally): CI's
# time already holds every smoke chain once, in tests/experiments/.
EXPERIMENT = "neupims"

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("GEMVLAB_SLURM")),
    reason="starts a Slurm cluster as root: runs in CI, or with GEMVLAB_SLURM=1")


def snakemake(results: Path, *args: str, timeout_s: int) -> subprocess.CompletedProcess:
    """snakemake under a hard `timeout`: a lost status check can leave it deaf to SIGTERM."""
    cmd = ["timeout", "-k", "30", str(timeout_s), sys.executable, "-m", "snakemake", *args,
           "--config", "scale=smoke", f"experiments={EXPERIMENT}", f"results={results}"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)


def table_specs() -> dict[str, dict]:
    cfg = compose([f"experiment={EXPERIMENT}", "scale=smoke"])
    return OmegaConf.to_container(cfg.experiment.tables, resolve=True)


def test_slurm_run_gives_the_local_tables(tmp_path: Path):
    assert os.geteuid() == 0, "the Slurm test installs packages and starts daemons: run as root"
    install_packages()
    local, cluster_out = tmp_path / "local", tmp_path / "slurm"
    proc = snakemake(local, "--cores", "2", timeout_s=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cluster = SlurmCluster(tmp_path / "cluster")
    try:
        cluster.start()
        proc = snakemake(cluster_out, "--profile", "profiles/slurm",
                         # no slurmdbd here, so no sacct; squeue sees jobs for MinJobAge
                         "--slurm-status-command", "squeue",
                         "--slurm-init-seconds-before-status-checks", "5",
                         "--seconds-between-status-checks", "5",
                         "--slurm-logdir", str(tmp_path / "slurm-logs"), timeout_s=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T %j"], capture_output=True,
                              text=True, check=True).stdout.split("\n")
    finally:
        still_alive = cluster.stop()
    assert not still_alive, f"daemons that needed SIGKILL: {still_alive}"

    # Every simulation went through Slurm and finished there.
    runs = plan_experiment(EXPERIMENT, ["scale=smoke", f"paths.results={cluster_out}"])
    completed = [line for line in jobs if line.startswith("COMPLETED")]
    assert len(completed) == len(runs) > 0, jobs
    for name, spec in table_specs().items():
        ours = pd.read_csv(cluster_out / "tables" / EXPERIMENT / f"{name}.csv")
        theirs = pd.read_csv(local / "tables" / EXPERIMENT / f"{name}.csv")
        pd.testing.assert_frame_equal(untimed(ours, spec), untimed(theirs, spec),
                                      check_exact=True, obj=name)
    assert (cluster_out / "CLAIMS.md").exists()
    assert (cluster_out / f"report-{EXPERIMENT}.html").exists()  # a partial plan's report
