"""Tables are built only from run records on disk; these tests write real record folders."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from gemvlab.errors import GemvlabError
from gemvlab.results.tables import (
    Record,
    build_table,
    format_number,
    load_record,
    to_markdown,
    write_table,
)


def write_record(root: Path, run_id: str, model: str, scale: str, metrics: dict | None) -> Path:
    """A run record as a stage writes it; metrics=None leaves it incomplete."""
    run_dir = root / "results" / "runs" / "baseline" / run_id
    run_dir.mkdir(parents=True)
    config = {
        "experiment": {"id": "baseline"},
        "model": {"name": model},
        "eval": {"name": "lm_eval"},
        "scale": {"name": scale},
        "seed": 0,
    }
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    (run_dir / "provenance.json").write_text("{}")
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def parse_markdown(text: str) -> list[list[str]]:
    """Split a pipe table into cells, honouring escaped pipes."""
    rows = []
    for line in text.strip().splitlines():
        assert line.startswith("| ") and line.endswith(" |"), line
        cells = re.split(r"(?<!\\) \| ", line[2:-2])
        rows.append([cell.replace(r"\|", "|") for cell in cells])
    return rows


METRICS_A = {"ppl_austen": 21.3, "tokens_austen": 16384, "wall_s": 80.1}
METRICS_B = {"ppl_austen": 35.25, "tokens_austen": 8192}  # no wall_s


@pytest.fixture
def records(tmp_path: Path):
    # Written in the order b, a, so the default sort (by model) must reorder them.
    dir_b = write_record(tmp_path, "run-b", "smollm2-135m", "cpu", METRICS_B)
    dir_a = write_record(tmp_path, "run-a", "gemma3-270m", "cpu", METRICS_A)
    return [load_record(dir_b), load_record(dir_a)]


def test_load_record_reads_config_and_metrics(records):
    rec = records[1]
    assert rec.run_id == "run-a"
    assert rec.config["model"]["name"] == "gemma3-270m"
    assert rec.metrics == METRICS_A


def test_wide_table_values_and_column_order(records):
    spec = {
        "columns": {"model": "model.name", "scale": "scale.name"},
        "metrics": ["ppl_austen", "tokens_austen", "wall_s"],
    }
    df = build_table(records, spec)
    assert list(df.columns) == ["run_id", "commit", "lock", "model", "scale", "ppl_austen",
                                "tokens_austen", "wall_s"]
    assert list(df["run_id"]) == ["run-a", "run-b"]  # gemma3 < smollm2
    assert list(df["model"]) == ["gemma3-270m", "smollm2-135m"]
    assert list(df["ppl_austen"]) == [METRICS_A["ppl_austen"], METRICS_B["ppl_austen"]]
    assert list(df["tokens_austen"]) == [METRICS_A["tokens_austen"], METRICS_B["tokens_austen"]]
    assert df["wall_s"][0] == METRICS_A["wall_s"]
    assert math.isnan(df["wall_s"][1])


def test_pattern_table_rows_and_columns(tmp_path: Path):
    metrics_small = {
        "ppl_austen": 20.0,  # does not match the pattern: ignored
        "lmeval/piqa/acc_stderr": 0.034,  # first seen, so acc_stderr comes before acc
        "lmeval/piqa/acc": 0.61,
        "lmeval/arc_easy/acc": 0.52,
        "lmeval/arc_easy/acc_stderr": 0.035,
        "lmeval/arc_easy/n": 200,
        "lmeval/piqa/extra/acc": 1.0,  # placeholders match one path segment only
    }
    metrics_big = {"lmeval/piqa/acc_stderr": 0.03, "lmeval/piqa/acc": 0.66}
    recs = [
        load_record(write_record(tmp_path, "r1", "smollm2-135m", "cpu", metrics_small)),
        load_record(write_record(tmp_path, "r2", "gemma3-270m", "cpu", metrics_big)),
    ]
    df = build_table(
        recs, {"columns": {"model": "model.name"}, "pattern": "lmeval/{task}/{metric}"}
    )
    # Metric columns in first-seen order across records.
    assert list(df.columns) == ["run_id", "commit", "lock", "model", "task", "acc_stderr", "acc",
                                "n"]
    # Sorted by model, then task.
    got = [tuple(row) for row in df[["run_id", "model", "task"]].itertuples(index=False)]
    assert got == [
        ("r2", "gemma3-270m", "piqa"),
        ("r1", "smollm2-135m", "arc_easy"),
        ("r1", "smollm2-135m", "piqa"),
    ]
    for row in df.itertuples(index=False):
        source = metrics_small if row.run_id == "r1" else metrics_big
        for metric in ("acc", "acc_stderr", "n"):
            key = f"lmeval/{row.task}/{metric}"
            value = getattr(row, metric)
            assert value == source[key] if key in source else math.isnan(value)


def test_explicit_sort_is_stable(tmp_path: Path):
    recs = [
        Record(run_id=f"r{i:02d}", config={"model": {"name": f"m{i}"}}, metrics={"ppl": i % 3})
        for i in range(60)
    ]
    df = build_table(
        recs, {"columns": {"model": "model.name"}, "metrics": ["ppl"], "sort": ["ppl"]}
    )
    expected = sorted(recs, key=lambda rec: rec.metrics["ppl"])
    assert list(df["run_id"]) == [rec.run_id for rec in expected]  # sorted() is stable
    with pytest.raises(GemvlabError, match="nope"):
        build_table(recs, {"metrics": ["ppl"], "sort": ["nope"]})


def test_incomplete_record_is_an_error(tmp_path: Path):
    run_dir = write_record(tmp_path, "r1", "m", "cpu", metrics=None)
    with pytest.raises(GemvlabError, match=r"incomplete \(no metrics.json\): rerun it with"):
        load_record(run_dir)


@pytest.mark.parametrize("damage", ['{"ppl": 1.', '{"ppl": "x"}', "[1]"])
def test_a_damaged_record_names_the_command_that_remakes_it(tmp_path: Path, damage: str):
    run_dir = write_record(tmp_path, "r1", "m", "cpu", {"ppl": 1.0})
    (run_dir / "metrics.json").write_text(damage)
    with pytest.raises(GemvlabError, match="damaged") as err:
        load_record(run_dir)
    assert f"rm {run_dir / 'metrics.json'} && snakemake" in str(err.value)


def test_missing_config_is_an_error(tmp_path: Path):
    run_dir = write_record(tmp_path, "r1", "m", "cpu", {"ppl": 1.0})
    (run_dir / "config.yaml").unlink()
    with pytest.raises(GemvlabError, match="no config.yaml"):
        load_record(run_dir)


@pytest.mark.parametrize("text", ["{not json", '{"ppl": "high"}', '{"nested": {"a": 1}}', "[1]"])
def test_bad_metrics_are_an_error(tmp_path: Path, text: str):
    run_dir = write_record(tmp_path, "r1", "m", "cpu", {})
    (run_dir / "metrics.json").write_text(text)
    with pytest.raises(GemvlabError, match="metrics.json"):
        load_record(run_dir)


def test_missing_config_path_names_the_path(records):
    with pytest.raises(GemvlabError, match=r"'model\.size'"):
        build_table(records, {"columns": {"size": "model.size"}, "metrics": ["ppl_austen"]})


@pytest.mark.parametrize(
    "spec",
    [
        {"metrics": ["ppl_austen"], "pattern": "x/{a}"},
        {"columns": {"model": "model.name"}},
        {"pattern": "lmeval/task/metric"},
        {"columns": {"ppl_austen": "model.name"}, "metrics": ["ppl_austen"]},
    ],
)
def test_bad_specs_are_errors(records, spec):
    with pytest.raises(GemvlabError):
        build_table(records, spec)


def test_markdown_parses(records):
    df = build_table(
        records,
        {"columns": {"model": "model.name"}, "metrics": ["ppl_austen", "tokens_austen", "wall_s"]},
    )
    df.loc[0, "model"] = "a|b"
    rows = parse_markdown(to_markdown(df))
    assert rows[0] == list(df.columns)
    assert rows[1] == ["---", "---", "---", "---", "---:", "---:", "---:"]
    assert len(rows) - 2 == len(df)
    assert rows[2] == ["run-a", "unknown", "unrecorded", "a|b", "21.3", "16384", "80.1"]
    assert rows[3] == ["run-b", "unknown", "unrecorded", "smollm2-135m", "35.25", "8192", ""]


def test_each_row_names_the_commit_and_lock_its_record_was_made_under(tmp_path: Path):
    made = {"a": {"git_sha": "0123456789abcdef", "git_dirty": False, "lock_sha256": "L1"},
            "b": {"git_sha": "fedcba9876543210", "git_dirty": True, "lock_sha256": "L0"},
            "c": {"git_sha": "0123456789abcdef", "git_dirty": False}}
    recs = []
    for rid, prov in made.items():
        folder = write_record(tmp_path, rid, f"m{rid}", "cpu", {"ppl": 2.0})
        (folder / "provenance.json").write_text(json.dumps(prov))
        recs.append(load_record(folder))
    df = build_table(recs, {"columns": {"model": "model.name"}, "metrics": ["ppl"]}, "L1")
    assert df[["run_id", "commit", "lock"]].values.tolist() == [
        ["a", "0123456789", "current"], ["b", "fedcba9876+dirty", "other"],
        ["c", "0123456789", "unrecorded"]]
    (tmp_path / "results/runs/baseline/a/provenance.json").write_text("[1]")
    with pytest.raises(GemvlabError, match="provenance.json is damaged, not a mapping"):
        load_record(tmp_path / "results/runs/baseline/a")
    with pytest.raises(GemvlabError, match=r"more than one column the name\(s\) \['lock'\]"):
        build_table(recs, {"columns": {"lock": "model.name"}, "metrics": ["ppl"]})


@pytest.mark.parametrize(
    "value, text",
    [
        (0.61234, "0.6123"),
        (21.0, "21"),
        (16384.0, "16384"),
        (9999.7, "10000"),
        (1.23456e-5, "1.235e-05"),
        (float("nan"), ""),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


def test_write_table_writes_csv_and_markdown(records, tmp_path: Path):
    df = build_table(records, {"columns": {"model": "model.name"}, "metrics": ["ppl_austen"]})
    out = tmp_path / "results" / "tables" / "baseline"
    write_table(df, out, "perplexity", title="Perplexity", note="From results/runs.")
    assert sorted(p.name for p in out.iterdir()) == ["perplexity.csv", "perplexity.md"]
    back = pd.read_csv(out / "perplexity.csv")
    assert list(back.columns) == list(df.columns)
    assert list(back["run_id"]) == list(df["run_id"])
    assert list(back["ppl_austen"]) == list(df["ppl_austen"])
    text = (out / "perplexity.md").read_text()
    head, table = text.split("\n\n", 2)[:2], text.split("\n\n", 2)[2]
    assert head == ["# Perplexity", "From results/runs."]
    assert len(parse_markdown(table)) == 2 + len(df)


def test_where_keeps_rows_and_may_drop_runs_that_lack_a_column():
    """One experiment's runs of two stages feed different tables: a bench run has no
    method, and a table of quantize runs drops it by `where` before the lookup matters."""
    recs = [Record("q1", {"stage": "quantize", "method": {"name": "int8"}}, {"ppl": 3.0}),
            Record("q2", {"stage": "quantize", "method": {"name": "fp32"}}, {"ppl": 2.0}),
            Record("b1", {"stage": "bench"}, {"us": 5.0})]
    spec = {"columns": {"stage": "stage", "method": "method.name"}, "metrics": ["ppl"]}
    df = build_table(recs, {**spec, "where": "stage == 'quantize'"})
    assert list(df["run_id"]) == ["q2", "q1"] and list(df["ppl"]) == [2.0, 3.0]
    with pytest.raises(GemvlabError, match="'method.name'.*run b1"):
        build_table(recs, spec)
    with pytest.raises(GemvlabError, match="does not apply"):
        build_table(recs, {**spec, "where": "no_such_column == 1"})


def test_untimed_drops_only_the_declared_wall_clock_columns():
    from gemvlab.results.tables import untimed

    df = pd.DataFrame({"run_id": ["a"], "iterations": [1000.0], "wall_s": [0.1]})
    assert list(untimed(df, {"timed": ["wall_s"]}).columns) == ["run_id", "iterations"]
    assert untimed(df, {}).equals(df)
    with pytest.raises(GemvlabError, match="wall_ms"):
        untimed(df, {"timed": ["wall_ms"]})
    empty = pd.DataFrame({"run_id": []})   # no runs at this scale, so no metric columns
    assert untimed(empty, {"timed": ["wall_s"]}).equals(empty)
