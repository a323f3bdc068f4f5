"""Adding a paper touches no shared file: a toy experiment (a runner and a folder) dropped into
a copy of the repository is planned, run on a tiny model, tabulated and checked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from gemvlab.config import REPO_ROOT
from tests.tiny import save_model_folder

TOY = Path(__file__).parent / "plugin_toy"
SHARED = ("Snakefile", "rules", "conf", "src", "experiments", "profiles", "docs", "environment.yml",
          "pyproject.toml")


def _copy_repo(dest: Path) -> None:
    dest.mkdir()
    for name in SHARED:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)


def _add_toy(repo: Path, model: Path) -> None:
    """What a new paper adds: its method family (with runs.py) and its experiment folder."""
    family = repo / "src" / "gemvlab" / "toy"
    family.mkdir()
    (family / "__init__.py").write_text('"""A toy method family."""\n')
    shutil.copy2(TOY / "runs.py", family / "runs.py")
    folder = repo / "experiments" / "toy"
    shutil.copytree(TOY, folder, ignore=shutil.ignore_patterns("runs.py", "__pycache__"))
    exp = folder / "experiment.yaml"
    exp.write_text(exp.read_text().replace("MODEL_PATH", str(model)))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for name in SHARED
            for p in ([root / name] if (root / name).is_file() else (root / name).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)}


def test_a_toy_experiment_plugs_in_without_editing_a_shared_file(tmp_path: Path):
    repo = tmp_path / "repo"
    _copy_repo(repo)
    before = _files(repo)
    _add_toy(repo, save_model_folder(tmp_path / "tiny-src"))
    after = _files(repo)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing edited
    assert sorted(set(after) - set(before)) == [
        "experiments/toy/README.md", "experiments/toy/claims.yaml",
        "experiments/toy/conf/toy/squared.yaml", "experiments/toy/experiment.yaml",
        "src/gemvlab/toy/__init__.py", "src/gemvlab/toy/runs.py"]

    results, resources = tmp_path / "results", tmp_path / "resources"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)]),
           "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", str(results / "CLAIMS.md"), "--cores", "2",
         "--config", "experiments=toy", "scale=smoke", f"results={results}",
         f"resources={resources}", "overrides=logger=none"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weight_norms" in proc.stdout + proc.stderr  # the new stage got its own rule

    norms = pd.read_csv(results / "tables" / "toy" / "norms.csv")
    assert len(norms) == 2 * 7 + 1  # two layers x (q, k, v, o, gate, up, down) + the head
    assert (norms["fro"] > 0).all() and norms["run_id"].nunique() == 1
    claims = (results / "CLAIMS.md").read_text()
    assert "norms_positive" in claims and "reproduced" in claims
    record = next((results / "runs" / "toy").iterdir())
    assert (record / "provenance.json").is_file() and (resources / "models" / "tiny").is_dir()

    # A fresh fetch of the same model (a newer manifest) on a machine that has the records but
    # no Snakemake metadata (a fresh clone) does not make them stale.
    shutil.rmtree(repo / ".snakemake")
    manifest = resources / "models" / "tiny" / "manifest.json"
    later = (record / "metrics.json").stat().st_mtime + 60
    os.utime(manifest, (later, later))
    again = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", str(results / "CLAIMS.md"), "--config",
         "experiments=toy", "scale=smoke", f"results={results}", f"resources={resources}",
         "overrides=logger=none"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
