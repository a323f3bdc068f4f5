"""wandb tracking: offline runs land in the results folder and read back; logger=none does
nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from gemvlab.config import REPO_ROOT
from gemvlab.errors import GemvlabError
from gemvlab.tracking import Tracker, artifact_name, read_offline_run


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb offline, with its staging and cache folders kept out of the home directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    return {"kind": "wandb", "mode": "offline", "project": "gemvlab-test", "entity": None,
            "dir": str(tmp_path / "wandb")}


def only_run(wandb_dir):
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_offline_run_reads_back_metrics_table_and_artifacts(tmp_path, offline):
    # A config value over 32 KiB spans several log blocks (FIRST/MIDDLE/LAST records).
    tracker = Tracker(offline, name="baseline/demo/abc", group="baseline", job_type="demo",
                      config={"seed": 1, "blob": "x" * 70000})
    tracker.log_metrics({"ppl": 12.5, "tokens": 300})
    csv = tmp_path / "t.csv"
    df = pd.DataFrame({"model": ["a", "b"], "ppl": [1.0, float("nan")]})
    df.to_csv(csv, index=False)
    tracker.log_table("baseline/t", df, [csv])
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"name": "Org/Model 1", "files": {}}))
    tracker.log_artifact("Org/Model 1", "model-manifest", [manifest], metadata={"source": "hub"})
    tracker.finish()

    run = read_offline_run(only_run(tmp_path / "wandb"))
    assert (run["project"], run["name"]) == ("gemvlab-test", "baseline/demo/abc")
    assert (run["group"], run["job_type"]) == ("baseline", "demo")
    assert run["config"] == {"seed": 1, "blob": "x" * 70000}
    assert run["summary"]["ppl"] == 12.5 and run["summary"]["tokens"] == 300
    assert "acc" not in run["summary"] and all("acc" not in row for row in run["history"])
    assert [row["ppl"] for row in run["history"] if "ppl" in row] == [12.5]
    table = run["summary"]["baseline/t"]
    assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (2, 2)
    logged = {(a["name"], a["type"]): a for a in run["artifacts"]}
    assert logged[("baseline-t", "table")]["files"] == ["t.csv"]
    model = logged[("Org-Model-1", "model-manifest")]
    assert model["files"] == ["manifest.json"] and model["metadata"] == {"source": "hub"}
    assert run["exit_code"] == 0


def test_failed_run_reads_back_its_exit_code(tmp_path, offline):
    tracker = Tracker(offline, name="x", group="g", job_type="j", config={})
    tracker.finish(failed=True)
    run = read_offline_run(only_run(tmp_path / "wandb"))
    assert run["exit_code"] == 1 and run["summary"].get("ppl") is None and not run["artifacts"]


def test_reader_rejects_what_is_not_a_run(tmp_path):
    bogus = tmp_path / "run-x.wandb"
    bogus.write_bytes(b"not a wandb log")
    with pytest.raises(GemvlabError, match="not a wandb transaction log"):
        read_offline_run(bogus)
    with pytest.raises(GemvlabError, match="holds 0 .wandb files"):
        read_offline_run(tmp_path / "empty")


def test_artifact_names_are_made_wandb_safe():
    assert artifact_name("baseline/t") == "baseline-t"
    assert artifact_name("Qwen/Qwen2.5-0.5B:v1 (fp32)") == "Qwen-Qwen2.5-0.5B-v1-fp32"
    assert artifact_name("smollm2-135m") == "smollm2-135m"
    assert len(artifact_name("a" * 300)) == 128
    with pytest.raises(GemvlabError):
        artifact_name("///")


def run_script(script: str, expect_stderr: tuple[str, ...] = ()) -> None:
    """Run a script that must exit 0; with ``expect_stderr``, its stderr must hold one error
    line, holding each of those strings, and no traceback."""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if expect_stderr:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and all(s in errors[0] for s in expect_stderr), \
            proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_fetch_model_logs_its_manifest_as_an_artifact(tmp_path, offline):
    res, out = tmp_path / "res", tmp_path / "out"
    run_script(f"""
import sys
from gemvlab.stages.fetch_model import fetch_model
sys.argv = ["fetch_model", "model=random-tiny-llama", "paths.resources={res}",
            "paths.results={out}", "hydra.run.dir={res}/models/random-tiny-llama"]
fetch_model()
""")
    run = read_offline_run(only_run(out / "wandb"))
    assert run["job_type"] == "fetch_model" and run["exit_code"] == 0
    [art] = [a for a in run["artifacts"] if a["type"] == "model-manifest"]
    assert art["name"] == "random-tiny-llama" and art["files"] == ["manifest.json"]
    assert art["metadata"]["source"] == "random" and "files" not in art["metadata"]
    assert run["summary"]["files"] == 1


def test_fetch_data_logs_its_manifest_as_an_artifact(tmp_path, offline):
    """The real builders download (apt-get, pip); a stand-in builds the folder instead."""
    res, out = tmp_path / "res", tmp_path / "out"
    run_script(f"""
import sys
import gemvlab.data.fetch as fetch
from gemvlab.manifest import write_manifest

def build(cfg, resources):
    folder = fetch.data_dir(resources, cfg["name"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text('{{"text": "x"}}\\n')
    return write_manifest(folder, {{"name": cfg["name"], "license": "PD"}},
                          [folder / "test.jsonl"])

fetch.fetch_dataset = build
from gemvlab.stages.fetch_data import fetch_data
sys.argv = ["fetch_data", "data=austen", "paths.resources={res}", "paths.results={out}",
            "hydra.run.dir={res}/data/austen"]
fetch_data()
""")
    run = read_offline_run(only_run(out / "wandb"))
    assert run["job_type"] == "fetch_data"
    [art] = [a for a in run["artifacts"] if a["type"] == "dataset-manifest"]
    assert art["name"] == "austen" and art["files"] == ["manifest.json"]
    assert art["metadata"] == {"name": "austen", "license": "PD"}


def test_logger_none_and_disabled_do_nothing(tmp_path):
    for cfg in ({"kind": "none"}, {"kind": "wandb", "mode": "disabled", "dir": str(tmp_path)}):
        tracker = Tracker(cfg, name="x", group="g", job_type="j", config={})
        tracker.log_metrics({"a": 1.0})
        tracker.log_artifact("a", "table", [tmp_path / "missing.csv"])
        tracker.finish()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("answers", "says"), [
    (True, ("wandb cannot start a run in logger.mode=online (No API key",)),
    # Not 96 s of wandb's retries, then a traceback: the probe fails at once (nothing listens).
    (False, ("wandb cannot log online (http://127.0.0.1:", "unreachable",
             "pass logger.mode=offline", "logger=none")),
])
def test_online_trouble_is_a_one_line_error(tmp_path, monkeypatch, answers: bool,
                                            says: tuple[str, ...]):
    """The wandb server is a local one (this machine may be offline), found through wandb's
    own settings (WANDB_BASE_URL); with no server the error names logger.mode=offline."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("HOME", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    run_script(f"""
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

class Quiet(BaseHTTPRequestHandler):  # answers every request with 501: an answer all the same
    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Quiet)
os.environ["WANDB_BASE_URL"] = f"http://127.0.0.1:{{server.server_port}}"
if {answers}:
    threading.Thread(target=server.serve_forever, daemon=True).start()
else:
    server.server_close()
from gemvlab.stages.fetch_model import fetch_model
sys.argv = ["fetch_model", "model=random-tiny-llama", "paths.resources={tmp_path}/res",
            "paths.results={tmp_path}/out", "logger.mode=online",
            "hydra.run.dir={tmp_path}/res/models/random-tiny-llama"]
try:
    fetch_model()
except SystemExit as exc:
    sys.exit(0 if exc.code == 1 else 3)
sys.exit(4)
""", expect_stderr=says)
