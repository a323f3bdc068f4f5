"""Check a paper's claims against result tables, with checks fixed in claims.yaml before a run.

Each claim selects rows of one table (`where`, optionally per `group_by` group), computes a
`measure` from their columns and applies a fixed `check` ("> 3") to every measured value.
The claims file is trusted project config: `measure` is evaluated with Python's eval (builtins
removed, numpy as `np`), and `where` with pandas' DataFrame.query.
"""

from __future__ import annotations

import html
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from gemvlab.errors import GemvlabError
from gemvlab.results.tables import format_number, to_markdown

SCALES = ("smoke", "cpu", "gpu", "paper")
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_TESTABLE = "not testable at this scale"
# No rows to check: the runs were not made, or their records left the plan; never a failure.
RECORD_MISSING = "record missing"
STATUSES = (REPRODUCED, NOT_REPRODUCED, RECORD_MISSING, NOT_TESTABLE)

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_CHECK = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*")
_REQUIRED = ("id", "paper", "table", "measure", "check", "scale")
_FILE_KEYS = ("experiment", "claims")
_SHOWN_VALUES = 3  # more values than this are summarised as min/max


def _parse_check(check: str) -> tuple[str, float]:
    """Split "> 3" into (">", 3.0); a check that does not parse is a claims-file bug."""
    match = _CHECK.fullmatch(check)
    try:
        threshold = float(match.group(2)) if match else math.nan
    except ValueError:
        threshold = math.nan
    if match is None or math.isnan(threshold):
        raise GemvlabError(
            f"key 'check': {check!r} is not an operator ({' '.join(_OPERATORS)}) and a number"
        )
    return match.group(1), threshold


@dataclass(frozen=True)
class Claim:
    """One claim of a paper (or a sanity statement of the pipeline) and its fixed check."""

    id: str
    paper: str
    table: str
    measure: str
    check: str
    scale: str
    paper_value: str = ""
    setting: str = ""
    where: str | None = None
    group_by: tuple[str, ...] = ()
    min_rows: int = 1
    why_untestable: str | None = None

    def __post_init__(self) -> None:
        """Validate here, so a bad claim fails when the file is loaded, not mid-report."""
        for key in _REQUIRED:
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise GemvlabError(f"claim {self.id!r}: key {key!r} must be a non-empty string")
        for key in ("paper_value", "setting"):
            if not isinstance(getattr(self, key), str):
                raise GemvlabError(f"claim {self.id!r}: key {key!r} must be a string")
        for key in ("where", "why_untestable"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise GemvlabError(f"claim {self.id!r}: key {key!r} must be a string")
        if not isinstance(self.group_by, tuple) or not all(
            isinstance(col, str) for col in self.group_by
        ):
            raise GemvlabError(f"claim {self.id!r}: key 'group_by' must be a list of columns")
        if (
            isinstance(self.min_rows, bool)
            or not isinstance(self.min_rows, int)
            or self.min_rows < 1
        ):
            raise GemvlabError(f"claim {self.id!r}: key 'min_rows' must be an integer >= 1")
        if self.scale not in SCALES:
            raise GemvlabError(
                f"claim {self.id!r}: key 'scale': unknown scale {self.scale!r} (one of {SCALES})"
            )
        try:
            _parse_check(self.check)
            compile(self.measure, f"<measure of claim {self.id}>", "eval")
        except GemvlabError as err:
            raise GemvlabError(f"claim {self.id!r}: {err}") from None
        except SyntaxError as err:
            raise GemvlabError(f"claim {self.id!r}: key 'measure': syntax error ({err})") from None

    @property
    def comparison(self) -> tuple[str, float]:
        """The check as (operator, threshold)."""
        return _parse_check(self.check)


@dataclass(frozen=True)
class ClaimResult:
    """The outcome of checking one claim, ready to render."""

    experiment: str
    claim: Claim
    status: str
    value: str
    detail: str


_CLAIM_KEYS = tuple(f.name for f in fields(Claim))


def load_claims(path: Path) -> tuple[str, list[Claim]]:
    """Read experiments/<id>/claims.yaml strictly: a typo in a key must not skip a check."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise GemvlabError(f"claims file {path} does not exist") from err
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise GemvlabError(f"claims file {path} is not readable YAML ({err})") from err
    if not isinstance(data, dict):
        raise GemvlabError(f"claims file {path} must be a mapping with keys {_FILE_KEYS}")
    unknown = sorted(map(str, set(data) - set(_FILE_KEYS)))
    experiment, entries = data.get("experiment"), data.get("claims")
    if unknown:
        raise GemvlabError(f"claims file {path}: unknown key(s) {unknown} (allowed: {_FILE_KEYS})")
    if not isinstance(experiment, str) or not experiment:
        raise GemvlabError(f"claims file {path}: key 'experiment' must name the experiment")
    if not isinstance(entries, list):
        raise GemvlabError(f"claims file {path}: key 'claims' must be a list of claims")
    claims: list[Claim] = []
    for number, entry in enumerate(entries, start=1):
        claims.append(_claim_from_entry(path, number, entry))
    ids = [claim.id for claim in claims]
    duplicates = sorted({cid for cid in ids if ids.count(cid) > 1})
    if duplicates:
        raise GemvlabError(f"claims file {path}: duplicate claim id(s) {duplicates}")
    return experiment, claims


def _claim_from_entry(path: Path, number: int, entry: Any) -> Claim:
    """Build one Claim, naming the file, claim id and key in every error."""
    if not isinstance(entry, dict):
        raise GemvlabError(f"claims file {path}: claim #{number} is not a mapping")
    name = entry.get("id", f"#{number}")
    unknown = sorted(map(str, set(entry) - set(_CLAIM_KEYS)))
    if unknown:
        raise GemvlabError(
            f"claims file {path}: claim {name!r}: unknown key(s) {unknown} (allowed: {_CLAIM_KEYS})"
        )
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        raise GemvlabError(f"claims file {path}: claim {name!r}: missing key(s) {missing}")
    kwargs = dict(entry)
    if isinstance(kwargs.get("paper_value"), int | float) and not isinstance(
        kwargs["paper_value"], bool
    ):
        kwargs["paper_value"] = str(kwargs["paper_value"])  # YAML read an unquoted number
    if isinstance(kwargs.get("group_by"), list):
        kwargs["group_by"] = tuple(kwargs["group_by"])
    try:
        return Claim(**kwargs)
    except GemvlabError as err:
        raise GemvlabError(f"claims file {path}: {err}") from None


def check_claim(
    experiment: str, claim: Claim, tables: Mapping[str, pd.DataFrame], run_scale: str
) -> ClaimResult:
    """Check one claim. Missing rows give "record missing" (nothing was measured, so nothing
    failed); a broken expression raises."""
    if run_scale not in SCALES:
        raise GemvlabError(f"unknown run scale {run_scale!r} (one of {SCALES})")

    def result(status: str, detail: str, value: str = "") -> ClaimResult:
        return ClaimResult(experiment, claim, status, value, detail)

    if SCALES.index(run_scale) < SCALES.index(claim.scale):
        reason = claim.why_untestable or f"needs scale {claim.scale}, ran at {run_scale}"
        return result(NOT_TESTABLE, reason)
    table = tables.get(claim.table)
    if table is None:
        return result(RECORD_MISSING, f"table {claim.table} is missing")
    if table.empty:
        return result(RECORD_MISSING, f"table {claim.table} has no rows")
    rows = _select(experiment, claim, table)
    if rows.empty:
        return result(RECORD_MISSING, f"no rows of table {claim.table} match {claim.where!r}")
    groups = _groups(experiment, claim, rows)
    short = [(label, len(frame)) for label, frame in groups if len(frame) < claim.min_rows]
    if short:
        counts = ", ".join(
            f"{label} has {n} rows" if label else f"{n} rows selected" for label, n in short
        )
        return result(RECORD_MISSING, f"no data: {counts}, needs at least {claim.min_rows}")
    measured = [(label, _measure(experiment, claim, frame)) for label, frame in groups]
    value = "; ".join(
        f"{label}: {_describe(v)}" if label else _describe(v) for label, v in measured
    )
    values = np.concatenate([v for _, v in measured])
    if values.size == 0:
        return result(NOT_REPRODUCED, "the measure gave no values", value)
    op, threshold = claim.comparison
    passed = np.array([not math.isnan(v) and _OPERATORS[op](v, threshold) for v in values])
    check = f"{op} {format_number(threshold)}"
    if passed.all():
        detail = f"all {values.size} values {check}" if values.size > 1 else f"the value {check}"
        return result(REPRODUCED, detail, value)
    return result(NOT_REPRODUCED, _failure(values[~passed], values.size, op, check), value)


def _name(experiment: str, claim: Claim) -> str:
    """How errors name a claim, so the fix is easy to find."""
    return f"claim {claim.id!r} of experiment {experiment!r}"


def _select(experiment: str, claim: Claim, table: pd.DataFrame) -> pd.DataFrame:
    """Apply the claim's `where`; an expression that fails is a bug in the claims file."""
    if claim.where is None:
        return table
    try:
        return table.query(claim.where)
    except Exception as err:
        raise GemvlabError(
            f"{_name(experiment, claim)}: where {claim.where!r} failed on table {claim.table} "
            f"({type(err).__name__}: {err}): fix the claims file"
        ) from err


def _groups(experiment: str, claim: Claim, rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Split by `group_by` in table order; the label names the group in the report."""
    if not claim.group_by:
        return [("", rows)]
    unknown = [col for col in claim.group_by if col not in rows.columns]
    if unknown:
        raise GemvlabError(
            f"{_name(experiment, claim)}: group_by column(s) {unknown} are not in table "
            f"{claim.table} {list(rows.columns)}: fix the claims file"
        )
    grouped = rows.groupby(list(claim.group_by), sort=False, dropna=False)
    return [("/".join(map(str, key)), frame) for key, frame in grouped]


def _measure(experiment: str, claim: Claim, frame: pd.DataFrame) -> np.ndarray:
    """Evaluate the measure over the frame's columns; a scalar or a Series, as floats."""
    namespace = {str(col): frame[col] for col in frame.columns}
    try:
        # Columns are globals so that comprehensions in a measure can see them too.
        result = eval(claim.measure, {**namespace, "__builtins__": {}, "np": np})  # trusted config
    except Exception as err:
        raise GemvlabError(
            f"{_name(experiment, claim)}: measure {claim.measure!r} failed on table "
            f"{claim.table} ({type(err).__name__}: {err}): fix the claims file"
        ) from err
    if isinstance(result, pd.Series):
        result = result.to_numpy(dtype=float, na_value=np.nan)
    if not isinstance(result, np.ndarray | int | float | np.number | np.bool_):
        raise GemvlabError(
            f"{_name(experiment, claim)}: measure {claim.measure!r} gave a "
            f"{type(result).__name__}, not a number or a Series: fix the claims file"
        )
    try:
        return np.asarray(result, dtype=float).ravel()
    except (TypeError, ValueError) as err:
        raise GemvlabError(
            f"{_name(experiment, claim)}: measure {claim.measure!r} gave non-numbers ({err})"
        ) from err


def _describe(values: np.ndarray) -> str:
    """Our value(s) for people: a few listed, many summarised as min/max."""
    if values.size <= _SHOWN_VALUES:
        return ", ".join(format_number(v, nan="NaN") for v in values) or "no values"
    real = values[~np.isnan(values)]
    nans = values.size - real.size
    counts = f"{values.size} values" + (f", {nans} NaN" if nans else "")
    if real.size == 0:
        return f"NaN ({counts})"
    return f"min {format_number(real.min())}, max {format_number(real.max())} ({counts})"


def _failure(failed: np.ndarray, total: int, op: str, check: str) -> str:
    """Say how many values fail and the worst one, so the reader sees how far off we are."""
    real = failed[~np.isnan(failed)]
    notes = []
    if real.size and op in (">", ">="):
        notes.append(f"min {format_number(real.min())}")
    elif real.size and op in ("<", "<="):
        notes.append(f"max {format_number(real.max())}")
    elif real.size:
        notes.append(f"e.g. {format_number(real[0])}")
    if failed.size > real.size:
        notes.append(f"{failed.size - real.size} NaN")
    return f"{failed.size} of {total} values fail {check} ({', '.join(notes)})"


def claims_frames(results: Sequence[ClaimResult]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The status summary and one table per experiment: what both claims pages show."""
    statuses = [res.status for res in results]
    summary = pd.DataFrame({"status": STATUSES, "claims": [statuses.count(s) for s in STATUSES]})
    per_experiment: dict[str, pd.DataFrame] = {}
    for experiment in dict.fromkeys(res.experiment for res in results):
        per_experiment[experiment] = pd.DataFrame([
            {
                "claim id": res.claim.id,
                "claim (paper's words)": res.claim.paper.strip()
                + (f" (setting: {res.claim.setting.strip()})" if res.claim.setting else ""),
                "paper value": res.claim.paper_value,
                "our value": res.value,
                "scale": res.claim.scale,
                "status": res.status,
                "detail": res.detail,
            }
            for res in results
            if res.experiment == experiment
        ])
    return summary, per_experiment


def render_claims_md(results: Sequence[ClaimResult], generated_note: str) -> str:
    """The generated claims page: a status summary, then one table per experiment."""
    summary, per_experiment = claims_frames(results)
    lines = ["# Claims", ""]
    if generated_note:
        lines += [generated_note, ""]
    lines += ["## Summary", "", to_markdown(summary)]
    for experiment, df in per_experiment.items():
        lines += [f"## {experiment}", "", to_markdown(df)]
    return "\n".join(lines)


_CLAIMS_CSS = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;"
               "margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 6px;"
               "vertical-align:top;font-size:13px}th{background:#eee}")


def render_claims_html(results: Sequence[ClaimResult], generated_note: str) -> str:
    """The same page as a standalone HTML file, for Snakemake's report (which shows HTML)."""
    summary, per_experiment = claims_frames(results)
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>Claims</title>',
             f"<style>{_CLAIMS_CSS}</style></head><body>", "<h1>Claims</h1>",
             f"<p>{html.escape(generated_note)}</p>", "<h2>Summary</h2>",
             summary.to_html(index=False)]
    for experiment, df in per_experiment.items():
        parts += [f'<h2 id="{html.escape(experiment)}">{html.escape(experiment)}</h2>',
                  df.to_html(index=False, classes="claims", na_rep="")]
    return "\n".join([*parts, "</body></html>"]) + "\n"
