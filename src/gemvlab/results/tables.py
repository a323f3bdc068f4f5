"""Result tables built only from run records, so every number in a table traces to a run_id.

A table spec (from the experiment's Hydra config) names the config values to show
(`columns`: output name -> dotted config path) and the metrics, either as a list of keys
(`metrics`: a wide table, one row per run) or as a key template (`pattern`, e.g.
``"lmeval/{task}/{metric}"``: a long table, one row per run and value of every placeholder but
the last, whose values become the metric columns). Optional `where` keeps the rows matching a
pandas query over the table's columns; optional `sort` lists the columns to sort by. Optional
`timed` lists the wall-clock columns and `tolerance` (column -> relative difference) how far a
rerun's value may be from the committed one (gemvlab.results.drift; exact by default).

Every table also says, per row, what made its record: `commit` (the git commit, "+dirty" when
the tree differed from it) and `lock` (whether the record was made under the current
requirements.lock: "current", "other", or "unrecorded" for records older than the lock).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_text

RUN_ID = "run_id"
COMMIT, LOCK = "commit", "lock"
PROVENANCE_COLUMNS = (COMMIT, LOCK)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Record:
    """One completed stage run, as read back from its run record folder."""

    run_id: str
    config: dict
    metrics: dict[str, float]
    provenance: dict = field(default_factory=dict)


def read_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """Every table of a folder as written (CSV), the form claims and plots read."""
    # keep_default_na=False: a task or model called "NA" stays a string
    return {p.stem: pd.read_csv(p, keep_default_na=False, na_values=[""])
            for p in sorted(folder.glob("*.csv"))}


def rerun_hint(run_dir: Path) -> str:
    """The one command that remakes a damaged record: Snakemake reruns a run only when its
    metrics.json is missing, so the damaged file must go first."""
    return (f"remove it and rerun that run alone: rm {Path(run_dir) / 'metrics.json'} && "
            "snakemake (with the --config of this run)")


def load_record(run_dir: Path) -> Record:
    """Read a run record; refuse incomplete or damaged ones (metrics.json is written last),
    naming the record and the command that remakes it."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    config_path = run_dir / "config.yaml"
    hint = rerun_hint(run_dir)
    if not metrics_path.is_file():
        raise GemvlabError(f"run record {run_dir} is incomplete (no metrics.json): rerun it "
                           "with snakemake")
    if not config_path.is_file():
        raise GemvlabError(f"run record {run_dir} is damaged (no config.yaml): {hint}")
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GemvlabError(f"run record {metrics_path} is damaged, not readable JSON ({err}): "
                           f"{hint}") from err
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise GemvlabError(f"run record {config_path} is damaged, not readable YAML ({first}): "
                           f"{hint}") from err
    if not isinstance(config, dict):
        raise GemvlabError(f"run record {config_path} is damaged, not a mapping: {hint}")
    return Record(run_id=run_dir.name, config=config,
                  metrics=_check_metrics(metrics_path, metrics, hint),
                  provenance=_read_provenance(run_dir / "provenance.json", hint))


def _read_provenance(path: Path, hint: str) -> dict:
    """A record's provenance.json ({} when it has none)."""
    if not path.is_file():
        return {}
    try:
        provenance = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GemvlabError(f"run record {path} is damaged, not readable JSON ({err}): "
                           f"{hint}") from err
    if not isinstance(provenance, dict):
        raise GemvlabError(f"run record {path} is damaged, not a mapping: {hint}")
    return provenance


def made_by(record: Record, lock_sha256: str | None) -> dict[str, str]:
    """The commit and the lock a record was made under, as a table shows them."""
    prov = record.provenance
    sha = str(prov.get("git_sha") or "unknown")
    commit = sha[:10] + ("+dirty" if prov.get("git_dirty") else "")
    made = prov.get("lock_sha256")
    lock = "unrecorded" if not made else "current" if made == lock_sha256 else "other"
    return {COMMIT: commit, LOCK: lock}


def _check_metrics(path: Path, metrics: Any, hint: str) -> dict[str, float]:
    """Keep the metrics contract (a flat dict of numbers) so tables never hold odd objects."""
    if not isinstance(metrics, dict):
        raise GemvlabError(f"run record {path} is damaged, not a flat JSON object of numbers: "
                           f"{hint}")
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GemvlabError(f"run record {path} is damaged, metric {key!r} is {value!r}, not "
                               f"a number: {hint}")
        checked[key] = value
    return checked


def build_table(records: Sequence[Record], spec: Mapping,
                lock_sha256: str | None = None) -> pd.DataFrame:
    """Turn run records into one table as the spec says; the caller fixes the record order.
    ``lock_sha256``: the current lock file's, which the `lock` column compares records with."""
    columns = spec.get("columns") or {}
    if not isinstance(columns, Mapping):
        raise GemvlabError("table spec 'columns' must map output column names to config paths")
    has_metrics, has_pattern = spec.get("metrics") is not None, spec.get("pattern") is not None
    if has_metrics == has_pattern:
        raise GemvlabError("table spec needs exactly one of 'metrics' (a list) or 'pattern'")
    if has_metrics:
        rows, placeholders, metric_cols = _wide_rows(records, columns, spec["metrics"])
    else:
        rows, placeholders, metric_cols = _long_rows(records, columns, spec["pattern"])
    made = {rec.run_id: made_by(rec, lock_sha256) for rec in records}
    rows = [{**row, **made[row[RUN_ID]]} for row in rows]
    order = [RUN_ID, *PROVENANCE_COLUMNS, *columns, *placeholders, *metric_cols]
    clashes = sorted({name for name in order if order.count(name) > 1})
    if clashes:
        raise GemvlabError(f"table spec gives more than one column the name(s) {clashes}")
    df = _filtered(pd.DataFrame(rows, columns=order), spec.get("where"))
    _check_no_missing(df)
    sort = spec.get("sort")
    by = [*columns, *placeholders] if sort is None else [str(name) for name in sort]
    return _sorted(df, by)


def row_key(spec: Mapping) -> list[str]:
    """The columns that tell a table's rows apart: run_id and, for a `pattern`, every
    placeholder but the last (the rest are the config's `columns` and the metrics)."""
    if spec.get("pattern") is None:
        return [RUN_ID]
    return [RUN_ID, *_compile_pattern(str(spec["pattern"]))[1][:-1]]


class _Missing:
    """A config path a run lacks; allowed only in rows the spec's `where` drops."""

    def __init__(self, dotted: str) -> None:
        self.dotted = dotted

    def __repr__(self) -> str:
        return f"<missing {self.dotted}>"


def _config_values(record: Record, columns: Mapping) -> dict[str, Any]:
    """Look up each dotted config path; a path the run lacks becomes a _Missing marker."""
    values: dict[str, Any] = {}
    for name, dotted in columns.items():
        node: Any = record.config
        for part in str(dotted).split("."):
            if not isinstance(node, Mapping) or part not in node:
                node = _Missing(str(dotted))
                break
            node = node[part]
        if isinstance(node, Mapping | list):
            raise GemvlabError(f"config path {dotted!r} of run {record.run_id} is not a scalar")
        values[str(name)] = node
    return values


def _check_no_missing(df: pd.DataFrame) -> None:
    """A config path missing in a row that stays is a spec typo: fail loudly, not with NaN."""
    for name in df.columns:
        for run, value in zip(df[RUN_ID], df[name], strict=True):
            if isinstance(value, _Missing):
                raise GemvlabError(
                    f"config path {value.dotted!r} (column {name!r}) is missing in the config "
                    f"of run {run}: fix the table spec (or its `where`)")


def _wide_rows(
    records: Sequence[Record], columns: Mapping, metrics: Any
) -> tuple[list[dict], list[str], list[str]]:
    """One row per record with the listed metrics; a metric a run lacks is NaN."""
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
        raise GemvlabError("table spec 'metrics' must be a non-empty list of metric keys")
    keys = [str(key) for key in metrics]
    rows = [
        {
            RUN_ID: rec.run_id,
            **_config_values(rec, columns),
            **{key: rec.metrics.get(key, math.nan) for key in keys},
        }
        for rec in records
    ]
    return rows, [], keys


def _compile_pattern(pattern: str) -> tuple[re.Pattern[str], list[str]]:
    """Turn a key template into a regex; each placeholder matches one path segment."""
    parts, names, pos = [], [], 0
    for match in _PLACEHOLDER.finditer(pattern):
        name = match.group(1)
        if not name.isidentifier() or name in names:
            raise GemvlabError(
                f"table pattern {pattern!r}: placeholder {{{name}}} must be a unique identifier"
            )
        parts += [re.escape(pattern[pos : match.start()]), f"(?P<{name}>[^/]+)"]
        names.append(name)
        pos = match.end()
    if not names:
        raise GemvlabError(f"table pattern {pattern!r} has no {{placeholder}}")
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts)), names


def _long_rows(
    records: Sequence[Record], columns: Mapping, pattern: Any
) -> tuple[list[dict], list[str], list[str]]:
    """One row per record and placeholder values; the last placeholder names the columns."""
    if not isinstance(pattern, str):
        raise GemvlabError("table spec 'pattern' must be a string like 'lmeval/{task}/{metric}'")
    regex, names = _compile_pattern(pattern)
    row_keys = names[:-1]
    rows: list[dict] = []
    metric_cols: dict[str, None] = {}  # an ordered set: first-seen order
    for rec in records:
        base = {RUN_ID: rec.run_id, **_config_values(rec, columns)}
        groups: dict[tuple[str, ...], dict[str, float]] = {}
        for key, value in rec.metrics.items():
            match = regex.fullmatch(key)
            if match is None:
                continue
            *group, column = (match.group(name) for name in names)
            groups.setdefault(tuple(group), {})[column] = value
            metric_cols.setdefault(column, None)
        rows += [
            {**base, **dict(zip(row_keys, group, strict=True)), **values}
            for group, values in groups.items()
        ]
    return rows, row_keys, list(metric_cols)


def _filtered(df: pd.DataFrame, where: Any) -> pd.DataFrame:
    """Keep the rows a table spec's `where` query selects (all rows when it has none)."""
    if where is None or df.empty:
        return df
    try:
        return df.query(str(where), engine="python").reset_index(drop=True)
    except Exception as err:  # pandas raises many types for a bad query; all are spec errors
        raise GemvlabError(f"table spec where {where!r} does not apply to columns "
                           f"{list(df.columns)}: {err}") from err


def _sorted(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Stable sort, so rows with equal keys keep the caller's record order."""
    if not by or df.empty:
        return df
    unknown = [name for name in by if name not in df.columns]
    if unknown:
        raise GemvlabError(
            f"table sort column(s) {unknown} are not in the table {list(df.columns)}"
        )
    try:
        return df.sort_values(by, kind="stable", na_position="last").reset_index(drop=True)
    except TypeError as err:
        raise GemvlabError(f"cannot sort the table by {by}: mixed value types ({err})") from err


def write_table(
    df: pd.DataFrame, out_dir: Path, name: str, title: str | None = None, note: str | None = None
) -> None:
    """Write <name>.csv (for machines) and <name>.md (for people), each atomically."""
    if not name or "/" in name or name.startswith("."):
        raise GemvlabError(f"table name {name!r} must be a plain file name")
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / f"{name}.csv", df.to_csv(index=False, lineterminator="\n"))
    head = "".join(f"{text}\n\n" for text in (f"# {title}" if title else None, note) if text)
    atomic_write_text(out_dir / f"{name}.md", head + to_markdown(df))


def format_number(value: float, nan: str = "") -> str:
    """Four significant digits; from 1e4 up, rounded to whole numbers (16384, not 1.638e+04)."""
    value = float(value)
    if math.isnan(value):
        return nan
    text = f"{value:.4g}"
    if "e+" in text and abs(value) < 1e15:
        return f"{value:.0f}"
    return text


def _cell(value: Any) -> str:
    """One Markdown cell: numbers formatted, missing values empty, pipes escaped."""
    if isinstance(value, float | np.floating):
        text = format_number(value)
    elif value is None or value is pd.NA or value is pd.NaT:
        text = ""
    else:
        text = str(value)
    return text.replace("|", r"\|").replace("\r", " ").replace("\n", " ")


def untimed(df: pd.DataFrame, spec: Mapping) -> pd.DataFrame:
    """The table without the columns its spec marks `timed` (wall-clock measurements): what
    two runs of the same config, on any machine or executor, must give identically."""
    timed = [str(col) for col in spec.get("timed") or []]
    unknown = [col for col in timed if col not in df.columns]
    # A table without rows (a smaller scale leaves some runs out) has no metric columns either.
    if unknown and len(df):
        raise GemvlabError(f"table spec marks timed column(s) {unknown} that are not in the "
                           f"table {list(df.columns)}")
    return df.drop(columns=[col for col in timed if col in df.columns])


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub pipe table; numeric columns right-aligned. Own writer: no tabulate dependency."""
    numeric = [
        pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col])
        for col in df.columns
    ]
    lines = [
        "| " + " | ".join(_cell(col) for col in df.columns) + " |",
        "| " + " | ".join("---:" if num else "---" for num in numeric) + " |",
    ]
    lines += [
        "| " + " | ".join(_cell(v) for v in row) + " |"
        for row in df.itertuples(index=False, name=None)
    ]
    return "\n".join(lines) + "\n"
