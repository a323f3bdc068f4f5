"""Shared fixtures: a throwaway resources/results tree with a tiny model and tiny data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gemvlab.config import REPO_ROOT
from gemvlab.manifest import write_manifest
from tests.tiny import save_model_folder

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good "
         "fortune, must be in want of a wife. ") * 6


BOOKKEEPING = ("fetch_model", "fetch_data", "tables", "claims")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under `pytest -n`, the experiments' end-to-end tests go to one worker, in order, so the
    report test finds their runs; every other test goes wherever a worker is free. (The
    xdist_group mark would say the same, but pytest 9.2 drops it: pytest-xdist issue 1386.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ExperimentsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "experiments" if nodeid.startswith("tests/experiments/") else nodeid

    return ExperimentsTogether(config, log)


@pytest.fixture(scope="session", autouse=True)
def plan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plan cache (gemvlab.plan_cache) for the session, shared by the xdist workers and
    the Snakemake processes the tests start, never the user's."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "plans"
    os.environ["GEMVLAB_PLAN_CACHE"] = str(folder)
    return folder


def run_stage(stage: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a stage as a user would, from the repo root: `python -m gemvlab.stages <stage>`
    for run stages, `python -m gemvlab.stages.<stage>` for fetch_model, fetch_data, tables,
    claims."""
    entry = [f"gemvlab.stages.{stage}"] if stage in BOOKKEEPING else ["gemvlab.stages", stage]
    return subprocess.run([sys.executable, "-m", *entry, *overrides,
                           "logger=none"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """resources/ with a tiny model folder to fetch and an Austen-like test split."""
    resources, results = tmp_path / "resources", tmp_path / "results"
    model_src = save_model_folder(tmp_path / "tiny-src")
    austen = resources / "data" / "austen"
    austen.mkdir(parents=True)
    rows = [{"id": f"doc{i}", "text": PROSE} for i in range(3)]
    (austen / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_manifest(austen, {"name": "austen"}, [austen / "test.jsonl"])
    return {"resources": resources, "results": results, "model_src": model_src}


def tiny_overrides(tree: dict[str, Path]) -> list[str]:
    """A perplexity-only evaluation of the tiny local model on the tiny Austen split."""
    return [f"paths.resources={tree['resources']}", f"paths.results={tree['results']}",
            "model=local", "model.name=tiny", f"model.path={tree['model_src']}",
            "scale=smoke", "eval=perplexity", "eval.datasets=[austen]",
            "~eval.perplexity.sets.lambada"]
