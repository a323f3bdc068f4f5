"""Run one experiment's smoke plan through Snakemake, and check what every experiment shares.

An experiment's test file calls `run_smoke` and then asserts on its own tables and claims;
the shared checks are here: the job count the plan implies (runs, KV artifacts, tables,
claims, nothing fetched), every planned run recorded, and a second run that plans nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gemvlab.config import REPO_ROOT
from gemvlab.manifest import MANIFEST
from gemvlab.workflow import Workflow

# An hour fails a hung run well inside CI's limit; the real models' heaviest plan takes minutes.
TIMEOUT_S = 3600


@dataclass(frozen=True)
class Setup:
    """Where a smoke run reads models and data, and writes results."""

    resources: Path
    results: Path
    real: bool  # the packaged models (pytest -m slow), not the tiny stand-ins


@dataclass(frozen=True)
class Smoke:
    """The finished smoke run of one experiment."""

    experiment: str
    setup: Setup
    workflow: Workflow

    @property
    def real(self) -> bool:
        return self.setup.real

    @property
    def results(self) -> Path:
        return self.setup.results

    def layers(self, model: str) -> int:
        """Decoder layers of a model as fetched (30 for SmolLM2-135M, 2 for its stand-in)."""
        config = self.setup.resources / "models" / model / "config.json"
        return int(json.loads(config.read_text())["num_hidden_layers"])

    def table(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.results / "tables" / self.experiment / f"{name}.csv")

    @property
    def claims(self) -> str:
        return (self.results / "CLAIMS.md").read_text()

    def perplexity_ok(self, ppl: pd.Series, real_max: float) -> bool:
        """Finite and above 1; a real model's also below `real_max` (a random tiny model's is
        about its vocabulary size, so that bound would say nothing about it)."""
        upper = real_max if self.real else np.inf
        return bool(len(ppl)) and bool((np.isfinite(ppl) & (ppl > 1) & (ppl < upper)).all())


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def config(experiments: str, setup: Setup) -> dict[str, str]:
    """Smoke scale; on the tiny stand-ins without wandb, whose start (2 s) would be a fifth of
    each job (tests/test_tracking.py covers it; the real-model runs keep it)."""
    cfg = {"scale": "smoke", "experiments": experiments, "results": str(setup.results),
           "resources": str(setup.resources)}
    return cfg if setup.real else {**cfg, "overrides": "logger=none"}


def config_args(cfg: dict[str, str]) -> list[str]:
    return ["--config", *(f"{k}={v}" for k, v in cfg.items())]


def expected_jobs(wf: Workflow) -> int:
    """Runs, artifacts (CommVQ's KV collection and codebooks), one tables job per experiment,
    claims, and a fetch for each model or dataset without a manifest yet (none for the tiny
    stand-ins, which are laid out as the fetch stages write them)."""
    runs = [r for plan in wf.plan.values() for r in plan]
    needs = [str(p) for r in runs for p in wf.inputs_of(r, None)]
    needs += [str(p) for art, r in wf.artifacts.values() for p in wf.inputs_of(r, art.stage)]
    fetches = {p for p in needs if p.endswith(f"/{MANIFEST}") and not Path(p).is_file()}
    return len(runs) + len(wf.artifacts) + len(fetches) + len(wf.experiments) + 1


def run_smoke(experiment: str, setup: Setup) -> Smoke:
    """Make the experiment's tables and CLAIMS.md (not the report), then check the shared parts."""
    cfg = config(experiment, setup)
    wf = Workflow.from_config(cfg)
    targets = [f"{setup.results}/tables/{experiment}", f"{setup.results}/CLAIMS.md"]
    # A rerun into a results folder that already holds this experiment plans fewer jobs.
    fresh = not any((setup.results / "runs" / experiment / r.run_id).exists()
                    for r in wf.plan[experiment])
    jobs = expected_jobs(wf)  # before the run: it counts the fetches still to do
    # Tiny models: a job is mostly Python's imports, so two one-thread jobs at a time.
    threads = [] if setup.real else ["--max-threads", "1"]
    first = snakemake(*threads, *targets, *config_args(cfg))
    assert first.returncode == 0, first.stderr[-5000:]
    if fresh:
        total = re.search(r"^total\s+(\d+)$", first.stderr, re.MULTILINE)
        assert total and int(total.group(1)) == jobs, first.stderr[-5000:]
    for run in wf.plan[experiment]:
        assert (setup.results / "runs" / experiment / run.run_id / "metrics.json").is_file()
    again = snakemake("-n", *targets, *config_args(cfg))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-3000:]
    return Smoke(experiment, setup, wf)
