"""Drift tables (gemvlab.results.drift): a rerun's table cells against the committed ones."""

from __future__ import annotations

import math

import pytest

from gemvlab.errors import GemvlabError
from gemvlab.results.drift import (
    compare_cell,
    counts,
    drift_table,
    drifting_lines,
    main,
    render_markdown,
    summary_line,
)
from gemvlab.results.tables import Record

# A long table (one row per run and system) with a wall-clock column, as neupims' throughput.
SPEC = {"columns": {"model": "model"}, "pattern": "throughput/{system}/{metric}",
        "timed": ["wall_s"]}


def record(rid: str, model: str, **changed: float) -> Record:
    metrics = {"throughput/gpu/tokens_per_s": 100.0, "throughput/gpu/wall_s": 2.0,
               "throughput/pim/tokens_per_s": 300.0, "throughput/pim/wall_s": 3.0}
    return Record(rid, {"model": model}, {**metrics, **changed})


COMMITTED = [record("r1", "7b"), record("r2", "13b")]


def fresh(*recs: Record) -> dict[str, Record]:
    return {rec.run_id: rec for rec in recs}


def test_equal_tables_have_no_drift():
    table = drift_table(COMMITTED, fresh(*COMMITTED), {"throughput": SPEC}, {})
    # 2 runs x 2 systems x tokens_per_s; wall_s is timed, the model a config column
    assert len(table) == 4 and set(table["status"]) == {"same"}
    assert set(table["column"]) == {"tokens_per_s"}
    assert counts(table) == {"cells": 4, "drifting": 0, "within_tolerance": 0,
                             "runs_not_rerun": 0}
    assert summary_line("x", table) == ("x: 4 cells compared, 0 drifting, 0 within tolerance, "
                                        "max rel diff 0")
    assert "Every compared cell came back identical." in render_markdown("x", table, "s")


def test_a_changed_untimed_cell_is_one_drift_row_with_its_differences():
    rerun = fresh(COMMITTED[0], record("r2", "13b", **{"throughput/pim/tokens_per_s": 330.0}))
    table = drift_table(COMMITTED, rerun, {"throughput": SPEC}, {})
    drift = table[table["status"] != "same"]
    assert len(drift) == 1
    row = drift.iloc[0]
    assert (row["table"], row["run_id"], row["row"], row["column"]) == \
        ("throughput", "r2", "system=pim", "tokens_per_s")
    assert (row["committed"], row["fresh"], row["status"]) == (300.0, 330.0, "drift")
    assert row["abs_diff"] == pytest.approx(30.0) and row["rel_diff"] == pytest.approx(0.1)
    assert summary_line("x", table).endswith("1 drifting, 0 within tolerance, max rel diff 0.1")
    assert "| r2 | system=pim | tokens_per_s |" in render_markdown("x", table, "s")


def test_a_changed_timed_column_is_no_drift():
    rerun = fresh(*(record(r.run_id, r.config["model"], **{"throughput/gpu/wall_s": 99.0})
                    for r in COMMITTED))
    table = drift_table(COMMITTED, rerun, {"throughput": SPEC}, {})
    assert counts(table)["drifting"] == 0 and "wall_s" not in set(table["column"])
    untimed_spec = {k: v for k, v in SPEC.items() if k != "timed"}
    assert counts(drift_table(COMMITTED, rerun, {"t": untimed_spec}, {}))["drifting"] == 2


@pytest.mark.parametrize(("fresh_value", "status"), [(300.0 * 1.005, "within tolerance"),
                                                      (300.0 * 1.02, "drift")])
def test_the_specs_tolerance_is_honoured(fresh_value: float, status: str):
    rerun = fresh(COMMITTED[0], record("r2", "13b", **{"throughput/pim/tokens_per_s": fresh_value}))
    spec = {**SPEC, "tolerance": {"tokens_per_s": 0.01}}
    table = drift_table(COMMITTED, rerun, {"throughput": spec}, {})
    changed = table[table["status"] != "same"]
    assert list(changed["status"]) == [status] and set(table["tolerance"]) == {0.01}
    # the default is exact: the same half percent is drift without the spec's tolerance
    assert counts(drift_table(COMMITTED, rerun, {"throughput": SPEC}, {}))["drifting"] == 1


@pytest.mark.parametrize(("tolerance", "match"), [
    ({"wall_s": 0.1}, "'wall_s', not a compared column"),   # timed: never compared
    ({"model": 0.1}, "'model', not a compared column"),     # a config column
    ({"tokens_per_s": -1}, "must be a relative difference >= 0"),
    ({"tokens_per_s": "1%"}, "must be a relative difference >= 0"),
    ([0.1], "must map columns"),
])
def test_a_bad_tolerance_is_one_line(tolerance, match: str):
    with pytest.raises(GemvlabError, match=match):
        drift_table(COMMITTED, fresh(*COMMITTED), {"t": {**SPEC, "tolerance": tolerance}}, {})


def test_runs_not_rerun_are_listed_not_compared():
    """A GPU record on a CPU machine keeps its committed values on both sides: listed, never
    counted as a compared cell, whatever its record says."""
    table = drift_table(COMMITTED, fresh(COMMITTED[0]), {"throughput": SPEC},
                        {"r2": "needs CUDA"})
    assert counts(table) == {"cells": 2, "drifting": 0, "within_tolerance": 0,
                             "runs_not_rerun": 1}
    left = table[table["run_id"] == "r2"]
    assert list(left["status"]) == ["not rerun (needs CUDA)"]
    assert summary_line("x", table).endswith("; runs not rerun: 1 (needs CUDA)")
    assert "not rerun (needs CUDA)" in render_markdown("x", table, "s")


def test_a_metric_missing_on_one_side_drifts():
    gone = Record("r1", {"model": "7b"}, {"throughput/gpu/tokens_per_s": 100.0})  # no pim row
    table = drift_table(COMMITTED, fresh(gone, COMMITTED[1]), {"throughput": SPEC}, {})
    assert list(table.loc[table["status"] != "same", "status"]) == ["missing in fresh"]
    assert counts(table)["drifting"] == 1


def test_compare_cell():
    assert compare_cell(2.0, 2.0, 0.0) == (0.0, 0.0, "same")
    assert compare_cell(0.0, 1e-9, 0.5) == (1e-9, math.inf, "drift")  # a zero that moved
    assert compare_cell(4.0, 3.0, 0.25) == (1.0, 0.25, "within tolerance")
    assert compare_cell(math.nan, 3.0, 0.0)[2] == "missing in committed"


def test_drifting_lines_name_each_table_with_drift(tmp_path):
    clean = drift_table(COMMITTED, fresh(*COMMITTED), {"throughput": SPEC}, {})
    moved = drift_table(COMMITTED, fresh(record("r1", "7b", **{"throughput/pim/tokens_per_s":
                                                                  301.0}), COMMITTED[1]),
                        {"throughput": SPEC}, {})
    clean.to_csv(tmp_path / "a.csv", index=False)
    moved.to_csv(tmp_path / "b.csv", index=False)
    (tmp_path / "c.csv").write_text("a,b\n1,2\n")
    assert drifting_lines([tmp_path / "a.csv"]) == []
    assert drifting_lines([tmp_path / "a.csv", tmp_path / "b.csv"]) == [
        f"b: 1 of {len(moved)} cells drift: see {tmp_path / 'b.md'}"]
    with pytest.raises(GemvlabError, match="not a drift table"):
        drifting_lines([tmp_path / "c.csv"])
    with pytest.raises(SystemExit, match="1"):
        main([str(tmp_path / "b.csv")])
    main([str(tmp_path / "a.csv")])  # no drift: returns


def test_a_rerun_at_another_commit_or_lock_is_no_drift():
    later = {"git_sha": "1111111111aaaa", "git_dirty": True, "lock_sha256": "another"}
    rerun = [Record(r.run_id, r.config, r.metrics, later) for r in COMMITTED]
    table = drift_table(COMMITTED, fresh(*rerun), {"throughput": SPEC}, {})
    assert set(table["status"]) == {"same"} and not {"commit", "lock"} & set(table["column"])
