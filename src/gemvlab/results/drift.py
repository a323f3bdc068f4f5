"""Drift: how far a rerun's numbers are from the committed ones, table cell by table cell.

`snakemake verify` reruns an experiment's runs into a folder of their own; each of its tables is
then built twice by build_table, from the committed records and from the fresh ones (a run that
was not rerun keeps its committed record on both sides and is left out of the comparison). Every
cell outside the row key, the config's `columns`, the record's `commit` and `lock` and the
spec's `timed` (wall-clock) columns is compared: the numbers two runs of one config must give
again. A spec's `tolerance` (column -> largest relative difference) allows some; a column it
does not name must come back exactly.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from gemvlab.errors import GemvlabError
from gemvlab.results.tables import (
    PROVENANCE_COLUMNS,
    RUN_ID,
    Record,
    build_table,
    format_number,
    row_key,
    to_markdown,
    untimed,
)

CELL_COLUMNS = ["table", "run_id", "row", "column", "committed", "fresh", "abs_diff",
                "rel_diff", "tolerance", "status"]
SAME, WITHIN, DRIFT = "same", "within tolerance", "drift"
MISSING_FRESH, MISSING_COMMITTED = "missing in fresh", "missing in committed"
DRIFTING = (DRIFT, MISSING_FRESH, MISSING_COMMITTED)
NOT_RERUN = "not rerun"


def tolerances(spec: Mapping, compared: Sequence[str]) -> dict[str, float]:
    """A spec's `tolerance`, checked: compared columns to relative differences >= 0."""
    given = spec.get("tolerance") or {}
    if not isinstance(given, Mapping):
        raise GemvlabError("table spec 'tolerance' must map columns to relative differences, "
                           "e.g. {tokens_per_s: 0.01}")
    checked: dict[str, float] = {}
    for column, value in given.items():
        if column not in compared:
            raise GemvlabError(f"table spec tolerance names {column!r}, not a compared column "
                               f"of the table {list(compared)} (timed columns never are)")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise GemvlabError(f"table spec tolerance {column}: {value!r} must be a relative "
                               "difference >= 0 (0.01 for 1%)")
        checked[str(column)] = float(value)
    return checked


def compare_cell(committed: float, fresh: float, tolerance: float) -> tuple[float, float, str]:
    """Absolute and relative difference of one cell and its status; a relative difference
    from a committed 0 is infinite, so any change of a zero is drift."""
    if math.isnan(fresh):
        return math.nan, math.nan, MISSING_FRESH
    if math.isnan(committed):
        return math.nan, math.nan, MISSING_COMMITTED
    diff = abs(fresh - committed)
    if diff == 0:
        return 0.0, 0.0, SAME
    rel = diff / abs(committed) if committed else math.inf
    return diff, rel, WITHIN if rel <= tolerance else DRIFT


def compare_table(name: str, committed: pd.DataFrame, fresh: pd.DataFrame, spec: Mapping,
                  run_ids: set[str]) -> list[dict]:
    """One row per compared cell of the runs in ``run_ids``: matched by the row key, the
    timed columns dropped by untimed() (a column only one side has is NaN on the other)."""
    columns = list(dict.fromkeys([*committed.columns, *fresh.columns]))
    sides = [untimed(df.reindex(columns=columns), spec) for df in (committed, fresh)]
    key = row_key(spec)
    config = {str(c) for c in spec.get("columns") or {}}
    compared = [c for c in sides[0].columns
                if c not in key and c not in config and c not in PROVENANCE_COLUMNS]
    if not compared:
        return []
    tol = tolerances(spec, compared)
    cells = [side[side[RUN_ID].isin(run_ids)].melt(id_vars=key, value_vars=compared,
                                                   var_name="column", value_name="value")
             for side in sides]
    merged = cells[0].merge(cells[1], on=[*key, "column"], how="outer",
                            suffixes=("_committed", "_fresh"))
    merged = merged.dropna(subset=["value_committed", "value_fresh"], how="all")
    rows = []
    for cell in merged.to_dict("records"):
        old, new = float(cell["value_committed"]), float(cell["value_fresh"])
        abs_diff, rel_diff, status = compare_cell(old, new, tol.get(cell["column"], 0.0))
        rows.append({"table": name, "run_id": cell[RUN_ID],
                     "row": " ".join(f"{k}={cell[k]}" for k in key[1:]),
                     "column": cell["column"], "committed": old, "fresh": new,
                     "abs_diff": abs_diff, "rel_diff": rel_diff,
                     "tolerance": tol.get(cell["column"], 0.0), "status": status})
    return rows


def drift_table(committed: Sequence[Record], fresh: Mapping[str, Record],
                specs: Mapping[str, Mapping], not_rerun: Mapping[str, str]) -> pd.DataFrame:
    """Every table's cells for the runs rerun (``fresh``, by run_id), then one row per run
    left out with why (``not_rerun``), e.g. "not rerun (needs CUDA)"."""
    rebuilt = [fresh.get(rec.run_id, rec) for rec in committed]
    rows = [row for name, spec in specs.items()
            for row in compare_table(name, build_table(committed, spec),
                                     build_table(rebuilt, spec), spec, set(fresh))]
    rows += [{"run_id": rid, "status": f"{NOT_RERUN} ({why})"} for rid, why in not_rerun.items()]
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def counts(table: pd.DataFrame) -> dict[str, int]:
    """Cells compared, cells drifting (beyond tolerance, or missing on one side), cells within
    tolerance, and runs not rerun."""
    left = table["status"].astype(str).str.startswith(NOT_RERUN)
    status = table.loc[~left, "status"]
    return {"cells": len(status), "drifting": int(status.isin(DRIFTING).sum()),
            "within_tolerance": int((status == WITHIN).sum()), "runs_not_rerun": int(left.sum())}


def summary_line(experiment: str, table: pd.DataFrame) -> str:
    """The counts in one line, with the largest relative difference and why runs were left
    out: what a reader checks first."""
    n = counts(table)
    rel = table["rel_diff"].dropna()
    text = (f"{experiment}: {n['cells']} cells compared, {n['drifting']} drifting, "
            f"{n['within_tolerance']} within tolerance, max rel diff "
            f"{format_number(rel.max()) if len(rel) else '0'}")
    if n["runs_not_rerun"]:
        left = table["status"].astype(str).str.startswith(NOT_RERUN)
        why = sorted({s.removeprefix(f"{NOT_RERUN} (").removesuffix(")")
                      for s in table.loc[left, "status"]})
        text += f"; runs not rerun: {n['runs_not_rerun']} ({', '.join(why)})"
    return text


NOTE = ("Made by `snakemake verify` (`python -m gemvlab.stages.drift`): every cell of the "
        "experiment's tables but the `timed` ones, built from the committed run records and "
        "from a rerun of the same configs. The CSV lists every cell; this page the cells that "
        "differ and the runs not rerun.")


def render_markdown(experiment: str, table: pd.DataFrame, summary: str) -> str:
    """The page for people: the summary, then only what is not the same."""
    shown = table[table["status"] != SAME]
    body = to_markdown(shown) if len(shown) else "Every compared cell came back identical.\n"
    return (f"# Drift of {experiment}: committed records against a rerun\n\n{summary}\n\n"
            f"{NOTE}\n\n{body}")


def drifting_lines(tables: Sequence[Path]) -> list[str]:
    """One line per drift table (results/drift/<experiment>.csv) with cells that drift."""
    lines = []
    for path in tables:
        try:
            status = pd.read_csv(path, usecols=["status"])["status"].astype(str)
        except (OSError, ValueError) as exc:
            raise GemvlabError(f"{path}: not a drift table ({exc}); rerun snakemake verify") \
                from exc
        drifting = int(status.isin(DRIFTING).sum())
        if drifting:
            lines.append(f"{path.stem}: {drifting} of {len(status)} cells drift: see "
                         f"{path.with_suffix('.md')}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m gemvlab.results.drift <drift csv>...`: the last step of `snakemake verify`,
    which fails when a rerun did not give the committed numbers back."""
    tables = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        lines = drifting_lines(tables)
    except GemvlabError as exc:
        sys.exit(f"gemvlab verify: error: {exc}")
    for line in lines:
        print(f"gemvlab verify: {line}", file=sys.stderr)
    if lines:
        sys.exit(1)


if __name__ == "__main__":
    main()
