"""A record names the code that made it (the gemvlab files its run imported, hashed) and the lock
it ran under; a record whose code has changed since shows as such when the plan is made."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from gemvlab.config import REPO_ROOT
from gemvlab.files import sha256_file
from gemvlab.results.source import SRC_ROOT, code_changed, source_record, sources_hash
from gemvlab.workflow import Workflow


def test_a_run_records_the_code_it_imported_and_the_lock(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "gemvlab.stages", "simulate", "experiment=neupims", "scale=smoke",
         "sim.task=calibration", "logger=none", f"paths.results={tmp_path}",
         f"hydra.run.dir={run_dir}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prov = json.loads((run_dir / "provenance.json").read_text())
    files = prov["source"]["files"]
    assert {"gemvlab/stage.py", "gemvlab/hwsim/runs.py"} <= set(files)
    # only what the process imported: not the records migration, nor a peer's own subprocess
    assert not {"gemvlab/results/migrate.py", "gemvlab/kv/evict/peer_kvpress.py"} & set(files)
    assert prov["source"]["sha256"] == sources_hash(files)
    assert prov["lock_sha256"] == sha256_file(REPO_ROOT / "requirements.lock")
    assert code_changed(prov) is False


def test_changing_a_source_file_makes_its_records_stale(tmp_path: Path):
    record = source_record()
    root = tmp_path / "src"
    for rel in record["files"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SRC_ROOT / rel, root / rel)
    assert code_changed({"source": record}, root) is False
    (root / record["files"][-1]).write_text("# changed\n")
    assert code_changed({"source": record}, root) is True
    (root / record["files"][0]).unlink()
    assert code_changed({"source": record}, root) is True
    assert code_changed({}, root) is None  # made before records named their code


def test_the_plan_names_experiments_with_stale_records(tmp_path: Path, capsys):
    plan = Workflow.from_config({"scale": "smoke", "experiments": "neupims",
                                 "results": str(tmp_path)}).plan["neupims"]
    stale = {"source": {"files": ["gemvlab/stage.py"], "sha256": "0" * 64}}
    fresh = {"source": source_record()}
    for run, prov in zip(plan[:3], (stale, fresh, {}), strict=True):
        folder = tmp_path / "runs" / "neupims" / run.run_id
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
        (folder / "provenance.json").write_text(json.dumps(prov))
    capsys.readouterr()
    Workflow.from_config({"scale": "smoke", "experiments": "neupims", "results": str(tmp_path)})
    lines = [x for x in capsys.readouterr().err.splitlines() if "records," in x]
    assert lines == ["gemvlab: neupims: of its 3 records, 1 were made by code that has changed "
                     "since and 1 before records named their code; to refresh one, rm its "
                     "metrics.json and rerun snakemake"]
