"""Per-scale settings: one way to write them, resolved when a run is composed, so only the
value a run uses enters its config and run_id; and the migration that re-keyed old records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gemvlab.config import compose, plan_experiment, run_id, scale_names, select_scale, to_plain
from gemvlab.errors import GemvlabError
from gemvlab.results.migrate import migrate, moves

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
    assert run_id(before, "kv_eval") == run_id(after, "kv_eval")
    changed = to_plain(compose([*base, "eval.kv.n_items.cpu=7"]))
    assert changed["eval"]["kv"]["n_items"] == 7
    assert run_id(changed, "kv_eval") != run_id(before, "kv_eval")


def test_moves_accepts_only_scale_collapses_and_removed_by_scale_keys():
    old = {"window": 128, "window_by_scale": {"smoke": 16, "cpu": 128},
           "n": {"smoke": 1, "cpu": 6}, "x": 1}
    assert sorted(moves(old, {"window": 128, "n": 6, "x": 1}, "cpu", SCALES)) == [
        "n (per scale -> cpu)", "window_by_scale (removed; window holds the value)"]
    assert moves(old, {"window": 128, "n": 1, "x": 1}, "cpu", SCALES) is None  # wrong scale
    assert moves(old, {"window": 128, "n": 6, "x": 2}, "cpu", SCALES) is None  # a real change
    assert moves({"a": 1}, {"a": 1, "b": 2}, "cpu", SCALES) is None             # a new key


def _old_record(folder: Path, config: dict, stage: str) -> Path:
    """A record as an older commit wrote it: its folder named by the old config's run_id."""
    run_dir = folder / run_id(config, stage)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "provenance.json").write_text(json.dumps({"stage": stage}))
    (run_dir / "metrics.json").write_text(json.dumps({"ppl": 12.5}))
    return run_dir


def test_migration_rekeys_an_old_record_and_refuses_a_changed_one(tmp_path: Path):
    results = tmp_path / "results"
    planned = next(r for r in plan_experiment("keyformer", ["scale=cpu"])
                   if r.config["eval"]["name"] == "kv_summarization")
    old = json.loads(json.dumps(planned.config))
    old["eval"]["kv"]["n_items"] = {"smoke": 1, "cpu": 6, "gpu": 100, "paper": 1000}
    run_dir = _old_record(results / "runs" / "keyformer", old, "kv_eval")
    assert run_dir.name != planned.run_id
    done = migrate(results)
    assert [(d["from_run_id"], d["to_run_id"]) for d in done] == [(run_dir.name,
                                                                   planned.run_id)]
    moved = results / "runs" / "keyformer" / planned.run_id
    assert not run_dir.exists() and json.loads((moved / "metrics.json").read_text()) == {
        "ppl": 12.5}
    prov = json.loads((moved / "provenance.json").read_text())
    assert prov["migrations"][0]["moved"] == ["eval.kv.n_items (per scale -> cpu)"]
    assert run_id(yaml.safe_load((moved / "config.yaml").read_text()), "kv_eval") == moved.name
    assert migrate(results) == []  # done once

    old["eval"]["kv"]["max_new_tokens"] = 41  # not a move: a different run
    _old_record(results / "runs" / "keyformer", old, "kv_eval")
    with pytest.raises(GemvlabError, match="0 planned runs match"):
        migrate(results)
