"""Per-scale settings: one way to write them, resolved when a run is composed, so only the
value a run uses enters its config and run_id; and the migration that re-keys old records
(after a config move, a stage rename or a metric prefix rename)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import yaml

from gemvlab.config import compose, plan_experiment, run_id, scale_names, select_scale, to_plain
from gemvlab.errors import GemvlabError
from gemvlab.results.migrate import RENAMED_METRICS, RENAMED_STAGES, migrate, moves

SCALES = scale_names()


def test_a_per_scale_mapping_becomes_the_scales_value():
    node = {"n": {"smoke": 1, "cpu": 6, "gpu": 100, "paper": 1000}, "keep": {"cpu_x": 1},
            "deep": [{"k": {"smoke": [96], "cpu": [2048, 4096]}}]}
    assert select_scale(node, "cpu", SCALES) == {"n": 6, "keep": {"cpu_x": 1},
                                                 "deep": [{"k": [2048, 4096]}]}
    with pytest.raises(GemvlabError, match="eval.n gives values for scales .* none for paper"):
        select_scale({"eval": {"n": {"smoke": 1, "cpu": 2}}}, "paper", SCALES)


def test_a_paper_scale_value_does_not_change_a_cpu_run_id():
    """The issue's example: editing a paper-scale value reran cpu runs that never use it."""
    base = ["experiment=keyformer", "eval=kv_summarization", "scale=cpu"]
    before = to_plain(compose(base))
    after = to_plain(compose([*base, "eval.kv.n_items.paper=7"]))
    assert before["eval"]["kv"]["n_items"] == 6 and after == before
    assert run_id(before, "kv_evict_eval") == run_id(after, "kv_evict_eval")
    changed = to_plain(compose([*base, "eval.kv.n_items.cpu=7"]))
    assert changed["eval"]["kv"]["n_items"] == 7
    assert run_id(changed, "kv_evict_eval") != run_id(before, "kv_evict_eval")


def test_moves_accepts_only_scale_collapses_and_removed_by_scale_keys():
    old = {"window": 128, "window_by_scale": {"smoke": 16, "cpu": 128},
           "n": {"smoke": 1, "cpu": 6}, "x": 1}
    assert sorted(moves(old, {"window": 128, "n": 6, "x": 1}, "cpu", SCALES)) == [
        "n (per scale -> cpu)", "window_by_scale (removed; window holds the value)"]
    assert moves(old, {"window": 128, "n": 1, "x": 1}, "cpu", SCALES) is None  # wrong scale
    assert moves(old, {"window": 128, "n": 6, "x": 2}, "cpu", SCALES) is None  # a real change
    assert moves({"a": 1}, {"a": 1, "b": 2}, "cpu", SCALES) is None             # a new key


def _old_record(folder: Path, config: dict, stage: str, metrics: dict | None = None) -> Path:
    """A record as an older commit wrote it: its folder named by the old config's run_id."""
    run_dir = folder / run_id(config, stage)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "provenance.json").write_text(json.dumps({"stage": stage, "run_id": run_dir.name}))
    (run_dir / "metrics.json").write_text(json.dumps(metrics or {"ppl": 12.5}))
    return run_dir


def _bits(metrics: dict) -> dict:
    """Each value's exact bytes (NaN included), so equal means bit for bit."""
    return {k: struct.pack("<d", v) if isinstance(v, float) else v for k, v in metrics.items()}


# Values that a careless rewrite (rounding, float formatting) would change.
AWKWARD = [0.1 + 0.2, 1 / 3, 5e-324, 1.7976931348623157e308, math.nan, -0.0, 7]


def _planned(experiment: str, key: str, value: str):
    return next(r for r in plan_experiment(experiment, ["scale=cpu"])
                if r.config[key.split(".")[0]][key.split(".")[1]] == value)


def test_migration_rekeys_an_old_record_and_refuses_a_changed_one(tmp_path: Path):
    results = tmp_path / "results"
    planned = next(r for r in plan_experiment("keyformer", ["scale=cpu"])
                   if r.config["eval"]["name"] == "kv_summarization")
    old = json.loads(json.dumps(planned.config))
    old["eval"]["kv"]["n_items"] = {"smoke": 1, "cpu": 6, "gpu": 100, "paper": 1000}
    run_dir = _old_record(results / "runs" / "keyformer", old, "kv_evict_eval")
    assert run_dir.name != planned.run_id
    done = migrate(results)
    assert [(d["from_run_id"], d["to_run_id"]) for d in done] == [(run_dir.name,
                                                                   planned.run_id)]
    moved = results / "runs" / "keyformer" / planned.run_id
    assert not run_dir.exists() and json.loads((moved / "metrics.json").read_text()) == {
        "ppl": 12.5}
    prov = json.loads((moved / "provenance.json").read_text())
    assert prov["migrations"][0]["moved"] == ["eval.kv.n_items (per scale -> cpu)"]
    config = yaml.safe_load((moved / "config.yaml").read_text())
    assert run_id(config, "kv_evict_eval") == moved.name
    assert migrate(results) == []  # done once

    old["eval"]["kv"]["max_new_tokens"] = 41  # not a move: a different run
    _old_record(results / "runs" / "keyformer", old, "kv_evict_eval")
    with pytest.raises(GemvlabError, match="0 planned runs match"):
        migrate(results)


@pytest.mark.parametrize("experiment, old_stage, eval_name, old_metrics, new_metrics, renamed", [
    ("keyformer", "kv_eval", "kv_summarization",
     {"kv/h2o/50/rouge_l": AWKWARD[0], "eval_s": AWKWARD[1]},
     ["kv/h2o/50/rouge_l", "eval_s"], []),
    ("commvq", "kvq_eval", "kvq_quality",
     {"q/fp16/2048/ppl": AWKWARD[0], "mem/kivi1/2048/kv_bytes": AWKWARD[2],
      "pk/fp16/all/all/accuracy": AWKWARD[3], "mse/commvq1/all/key": AWKWARD[4],
      "load_s": AWKWARD[6]},
     ["continuation/fp16/2048/ppl", "cache/kivi1/2048/kv_bytes", "passkey/fp16/all/all/accuracy",
      "mse/commvq1/all/key", "load_s"],
     ["mem/ -> cache/", "pk/ -> passkey/", "q/ -> continuation/"]),
])
def test_migration_follows_a_renamed_stage(tmp_path: Path, experiment, old_stage, eval_name,
                                            old_metrics, new_metrics, renamed):
    """A record of a stage's old name moves to the run_id of its new name; its values stay
    bit for bit, under the new metric prefixes where its stage renamed some."""
    new_stage = RENAMED_STAGES[old_stage]
    results = tmp_path / "results"
    planned = _planned(experiment, "eval.name", eval_name)
    assert planned.stage == new_stage
    old = json.loads(json.dumps(planned.config))
    old["experiment"]["stage"] = old_stage
    run_dir = _old_record(results / "runs" / experiment, old, old_stage, old_metrics)
    assert run_dir.name != planned.run_id

    done = migrate(results)
    assert [(d["from_run_id"], d["to_run_id"]) for d in done] == [(run_dir.name,
                                                                   planned.run_id)]
    moved = results / "runs" / experiment / planned.run_id
    assert not run_dir.exists()
    metrics = json.loads((moved / "metrics.json").read_text())
    assert _bits(dict(zip(new_metrics, old_metrics.values(), strict=True))) == _bits(metrics)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    assert config["experiment"]["stage"] == new_stage
    assert run_id(config, new_stage) == moved.name
    prov = json.loads((moved / "provenance.json").read_text())
    assert (prov["stage"], prov["run_id"]) == (new_stage, moved.name)
    assert prov["migrations"][0]["moved"] == [f"stage {old_stage} -> {new_stage}"]
    assert prov["migrations"][0].get("renamed_metrics", []) == renamed
    assert all(r.split("/")[0] in RENAMED_METRICS[new_stage] for r in renamed)
    assert migrate(results) == []  # done once

    old["seed"] = old["seed"] + 1  # not a rename: a different run
    _old_record(results / "runs" / experiment, old, old_stage, old_metrics)
    with pytest.raises(GemvlabError, match="0 planned runs match"):
        migrate(results)


def test_migration_renames_metric_prefixes_in_place(tmp_path: Path):
    """neupims' calibration run: same config, same run_id; only metrics.json's keys change."""
    results = tmp_path / "results"
    planned = _planned("neupims", "sim.task", "calibration")
    old_metrics = {"cal/qkv/b4/rel_err": AWKWARD[0], "calsum/heldout/kernels": AWKWARD[6],
                   "calfit/e_compute": AWKWARD[1], "tput/gpu/b4/tokens_per_s": AWKWARD[3],
                   "util/npu/b4/npu_busy": AWKWARD[4], "wall_s": AWKWARD[5],
                   "caltech/x": AWKWARD[2]}  # a prefix that only starts like a renamed one
    run_dir = _old_record(results / "runs" / "neupims", planned.config, "simulate", old_metrics)
    assert run_dir.name == planned.run_id
    config_bytes = (run_dir / "config.yaml").read_bytes()

    done = migrate(results)
    assert done == [{"experiment": "neupims", "from_run_id": run_dir.name,
                     "to_run_id": run_dir.name, "moved": [],
                     "renamed_metrics": ["cal/ -> calibration/", "calfit/ -> calibration_fit/",
                                         "calsum/ -> calibration_summary/",
                                         "tput/ -> throughput/"]}]
    renamed = ["calibration/qkv/b4/rel_err", "calibration_summary/heldout/kernels",
               "calibration_fit/e_compute", "throughput/gpu/b4/tokens_per_s",
               "util/npu/b4/npu_busy", "wall_s", "caltech/x"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert _bits(metrics) == _bits(dict(zip(renamed, old_metrics.values(), strict=True)))
    assert (run_dir / "config.yaml").read_bytes() == config_bytes
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["migrations"][0]["renamed_metrics"] == done[0]["renamed_metrics"]
    assert migrate(results) == []  # done once

    changed = json.loads(json.dumps(planned.config))
    changed["seed"] += 1  # not a rename: a config this plan does not hold
    _old_record(results / "runs" / "neupims", changed, "simulate", old_metrics)
    with pytest.raises(GemvlabError, match="0 planned runs match"):
        migrate(results)


def test_migration_refuses_a_record_holding_both_names_of_a_prefix(tmp_path: Path):
    planned = _planned("neupims", "sim.task", "calibration")
    _old_record(tmp_path / "runs" / "neupims", planned.config, "simulate",
                {"tput/gpu/b4/batch": 4.0, "throughput/gpu/b4/batch": 4.0})
    with pytest.raises(GemvlabError, match="written twice"):
        migrate(tmp_path, dry_run=True)
