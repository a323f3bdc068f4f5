"""Planning is cached on disk (gemvlab.plan_cache): a hit gives the same runs a fresh plan
gives, and any change to what a plan depends on misses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemvlab import plan_cache
from gemvlab.config import REPO_ROOT, plan_experiment
from gemvlab.workflow import keys_read

ARGS = ("neupims", ["scale=smoke"], ["seed=3"], keys_read)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "plans"
    monkeypatch.setenv("GEMVLAB_PLAN_CACHE", str(folder))
    return folder


def test_a_hit_gives_what_planning_gives(cache: Path, monkeypatch: pytest.MonkeyPatch):
    first = plan_experiment(*ARGS)
    assert len(list(cache.glob("*.plan.json"))) == 1
    hit = plan_experiment(*ARGS)
    monkeypatch.setenv("GEMVLAB_PLAN_CACHE", "off")
    fresh = plan_experiment(*ARGS)
    assert hit == first == fresh and len(fresh) > 1


def test_a_tampered_entry_is_planned_again(cache: Path):
    first = plan_experiment(*ARGS)
    entry = next(cache.glob("*.plan.json"))
    runs = json.loads(entry.read_text())["runs"]
    runs[0]["config"]["seed"] = 4  # no longer hashes to its run_id
    entry.write_text(json.dumps({"runs": runs}))
    assert plan_experiment(*ARGS) == first
    entry.write_text("{not json")
    assert plan_experiment(*ARGS) == first


def test_the_key_follows_arguments_config_and_source(tmp_path: Path):
    conf, src = tmp_path / "conf", tmp_path / "src"
    (conf / "model").mkdir(parents=True)
    src.mkdir()
    (conf / "model" / "a.yaml").write_text("name: a\n")
    (src / "m.py").write_text("x = 1\n")

    def key(args: dict) -> str:
        return plan_cache.plan_key(args, [conf], src)

    base = key({"experiment": "x"})
    assert key({"experiment": "x"}) == base
    assert key({"experiment": "y"}) != base
    (conf / "model" / "a.yaml").write_text("name: b\n")
    changed_config = key({"experiment": "x"})
    (src / "m.py").write_text("x = 2\n")
    assert len({base, changed_config, key({"experiment": "x"})}) == 3
    (src / "notes.txt").write_text("not source")
    assert key({"experiment": "x"}) == key({"experiment": "x"})


def test_data_json_would_change_is_not_cached(tmp_path: Path):
    plan_cache.store(tmp_path, "k", [{"config": {1: "int key"}}])
    assert not list(tmp_path.iterdir())
    plan_cache.store(tmp_path, "k", [{"config": {"a": [1, 2.5, None]}}])
    assert plan_cache.load(tmp_path, "k", lambda runs: True) == [{"config": {"a": [1, 2.5, None]}}]
    assert plan_cache.load(tmp_path, "k", lambda runs: False) is None


def test_registering_every_runner_imports_no_torch():
    """The planner (every snakemake call) asks each runner what it needs: that must not cost
    the seconds of importing torch or transformers."""
    code = ("import sys; from gemvlab.registry import load_runners; load_runners(); "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
