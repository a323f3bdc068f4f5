"""Claims are checked against tables built from real run records; expectations come from data."""

from __future__ import annotations

import io
import json
import math
import operator
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from gemvlab.errors import GemvlabError
from gemvlab.results.claims import (
    NOT_REPRODUCED,
    NOT_TESTABLE,
    RECORD_MISSING,
    REPRODUCED,
    STATUSES,
    check_claim,
    load_claims,
    render_claims_html,
    render_claims_md,
)
from gemvlab.results.tables import build_table, format_number, load_record, write_table

# (acc, acc_stderr) per model and task; chance is 0.5 everywhere.
LMEVAL = {
    "smollm2-135m": {"piqa": (0.62, 0.03), "arc_easy": (0.58, 0.02), "lambada": (0.51, 0.04)},
    "gemma3-270m": {"piqa": (0.66, 0.03), "arc_easy": (0.61, 0.025), "lambada": (0.55, 0.02)},
}
CHANCE = 0.5
LOW = 0.2  # every z-score of LMEVAL passes "> LOW"; some fail "> 3"


def z_scores(model: str | None = None, skip: str | None = None) -> list[float]:
    """(acc - chance) / stderr straight from the data written, for expected outcomes."""
    return [
        (acc - CHANCE) / err
        for name, tasks in LMEVAL.items()
        if model in (None, name)
        for task, (acc, err) in tasks.items()
        if task != skip
    ]


@pytest.fixture
def tables(tmp_path: Path) -> dict[str, pd.DataFrame]:
    """Write run records, build and write the lm_eval table, and read it back as CSV."""
    records = []
    for i, (model, tasks) in enumerate(LMEVAL.items()):
        run_dir = tmp_path / "runs" / f"run-{i}"
        run_dir.mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"model": {"name": model}}), run_dir / "config.yaml")
        metrics = {}
        for task, (acc, err) in tasks.items():
            metrics |= {
                f"lmeval/{task}/acc": acc,
                f"lmeval/{task}/acc_stderr": err,
                f"lmeval/{task}/chance": CHANCE,
            }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        records.append(load_record(run_dir))
    spec = {"columns": {"model": "model.name"}, "pattern": "lmeval/{task}/{metric}"}
    out = tmp_path / "tables"
    write_table(build_table(records, spec), out, "lm_eval")
    return {"lm_eval": pd.read_csv(out / "lm_eval.csv")}


def write_claims(path: Path, claims: list[dict], experiment: str = "baseline") -> Path:
    path.write_text(yaml.safe_dump({"experiment": experiment, "claims": claims}))
    return path


def claim_dict(**overrides) -> dict:
    base = {
        "id": "lmeval_above_chance",
        "paper": "Accuracy is above chance.",
        "paper_value": "0.523 (SmolLM2 ARC-Easy)",
        "setting": "SmolLM2-135M, ARC-Easy, A100",
        "table": "lm_eval",
        "measure": "(acc - chance) / acc_stderr",
        "check": "> 3",
        "scale": "cpu",
    }
    return base | overrides


def one_claim(tmp_path: Path, **overrides):
    experiment, claims = load_claims(
        write_claims(tmp_path / "claims.yaml", [claim_dict(**overrides)])
    )
    return experiment, claims[0]


def status_for(values: list[float], threshold: float) -> str:
    return REPRODUCED if all(v > threshold for v in values) else NOT_REPRODUCED


def test_load_claims_reads_every_field(tmp_path: Path):
    experiment, claim = one_claim(tmp_path, where="task != 'lambada'", group_by=["model"])
    assert experiment == "baseline"
    assert claim.group_by == ("model",)
    assert claim.where == "task != 'lambada'"
    assert claim.min_rows == 1
    assert claim.comparison == (">", 3.0)


@pytest.mark.parametrize("threshold", [LOW, 3.0])
def test_check_over_all_rows(tmp_path: Path, tables, threshold: float):
    experiment, claim = one_claim(tmp_path, check=f"> {threshold}")
    res = check_claim(experiment, claim, tables, "cpu")
    values = z_scores()
    assert res.status == status_for(values, threshold)
    failing = [v for v in values if not v > threshold]
    if failing:
        expected = f"{len(failing)} of {len(values)} values fail > {threshold:g}"
        assert res.detail == f"{expected} (min {format_number(min(failing))})"
    else:
        assert res.detail == f"all {len(values)} values > {threshold:g}"


def test_data_makes_both_outcomes_possible():
    # Guards the test data: threshold 3 must fail somewhere, LOW nowhere.
    assert LOW < min(z_scores()) < 3


def test_where_and_group_by(tmp_path: Path, tables):
    experiment, claim = one_claim(
        tmp_path,
        where="task != 'lambada'",
        group_by=["model"],
        measure="((acc - chance) / acc_stderr).min()",
    )
    res = check_claim(experiment, claim, tables, "gpu")
    per_model = {model: min(z_scores(model, skip="lambada")) for model in LMEVAL}
    assert res.status == status_for(list(per_model.values()), 3.0)
    # Groups in table order (the table is sorted by model).
    expected = "; ".join(f"{m}: {format_number(v)}" for m, v in sorted(per_model.items()))
    assert res.value == expected


@pytest.mark.parametrize("op", [">", ">=", "<", "<=", "==", "!="])
def test_each_operator_at_the_boundary(tmp_path: Path, tables, op: str):
    accs = [acc for tasks in LMEVAL.values() for acc, _ in tasks.values()]
    threshold = min(accs)  # one value sits exactly on the threshold
    experiment, claim = one_claim(tmp_path, measure="acc", check=f"{op} {threshold}")
    res = check_claim(experiment, claim, tables, "cpu")
    compare = {
        ">": operator.gt,
        ">=": operator.ge,
        "<": operator.lt,
        "<=": operator.le,
        "==": operator.eq,
        "!=": operator.ne,
    }[op]
    expected = REPRODUCED if all(compare(acc, threshold) for acc in accs) else NOT_REPRODUCED
    assert res.status == expected


def test_groups_keep_table_order(tmp_path: Path, tables):
    table = tables["lm_eval"].iloc[::-1]  # reversed: first-seen order is not sorted order
    experiment, claim = one_claim(tmp_path, group_by=["model"], measure="acc.max()")
    res = check_claim(experiment, claim, {"lm_eval": table}, "cpu")
    expected = [f"{m}: {format_number(max(a for a, _ in LMEVAL[m].values()))}" for m in table.model]
    assert res.value == "; ".join(dict.fromkeys(expected))


def test_group_by_unknown_column_is_an_error(tmp_path: Path, tables):
    experiment, claim = one_claim(tmp_path, group_by=["hardware"])
    with pytest.raises(GemvlabError, match="lmeval_above_chance"):
        check_claim(experiment, claim, tables, "cpu")


def test_min_rows(tmp_path: Path, tables):
    rows_per_model = len(LMEVAL["smollm2-135m"])
    experiment, claim = one_claim(tmp_path, group_by=["model"], min_rows=rows_per_model + 1)
    res = check_claim(experiment, claim, tables, "cpu")
    assert res.status == RECORD_MISSING
    assert res.detail.startswith("no data")
    _, claim = one_claim(tmp_path, group_by=["model"], min_rows=rows_per_model, check=f"> {LOW}")
    assert check_claim(experiment, claim, tables, "cpu").status == status_for(z_scores(), LOW)


def test_where_selecting_nothing_is_a_missing_record(tmp_path: Path, tables):
    """No rows means nothing was measured (the runs left the plan), never a failed claim."""
    experiment, claim = one_claim(tmp_path, where="task == 'hellaswag'")
    res = check_claim(experiment, claim, tables, "cpu")
    assert res.status == RECORD_MISSING


def test_not_testable_below_the_claims_scale(tmp_path: Path, tables):
    experiment, claim = one_claim(tmp_path, scale="gpu", check=f"> {LOW}")
    res = check_claim(experiment, claim, tables, "cpu")
    assert (res.status, res.detail) == (NOT_TESTABLE, "needs scale gpu, ran at cpu")
    _, claim = one_claim(tmp_path, scale="paper", why_untestable="needs 8 H100s")
    assert check_claim(experiment, claim, tables, "smoke").detail == "needs 8 H100s"
    _, claim = one_claim(tmp_path, scale="smoke", check=f"> {LOW}")
    assert check_claim(experiment, claim, tables, "paper").status == status_for(z_scores(), LOW)


def test_missing_or_empty_table_is_a_missing_record(tmp_path: Path, tables):
    experiment, claim = one_claim(tmp_path, table="speed")
    res = check_claim(experiment, claim, tables, "cpu")
    assert res.status == RECORD_MISSING and "speed" in res.detail and "missing" in res.detail
    empty = {"lm_eval": tables["lm_eval"].iloc[0:0]}
    _, claim = one_claim(tmp_path)
    assert check_claim(experiment, claim, empty, "cpu").detail == "table lm_eval has no rows"


@pytest.mark.parametrize("check", ["> 0", "!= 5"])
def test_nan_fails_the_check(tmp_path: Path, tables, check: str):
    table = tables["lm_eval"].copy()
    table.loc[0, "acc"] = math.nan
    experiment, claim = one_claim(tmp_path, check=check)
    res = check_claim(experiment, claim, {"lm_eval": table}, "cpu")
    assert res.status == NOT_REPRODUCED
    assert res.detail.startswith(f"1 of {len(table)} values fail") and "1 NaN" in res.detail


def test_scalar_measure(tmp_path: Path, tables):
    experiment, claim = one_claim(tmp_path, measure="np.mean(acc)", check=">= 0.5")
    res = check_claim(experiment, claim, tables, "cpu")
    accs = [acc for tasks in LMEVAL.values() for acc, _ in tasks.values()]
    mean = sum(accs) / len(accs)
    assert res.value == format_number(mean)
    assert res.status == (REPRODUCED if mean >= 0.5 else NOT_REPRODUCED)


@pytest.mark.parametrize("measure", ["accuracy - chance", "acc.nosuchmethod()", "open('x')"])
def test_broken_measure_is_an_error_naming_the_claim(tmp_path: Path, tables, measure: str):
    experiment, claim = one_claim(tmp_path, measure=measure)
    with pytest.raises(GemvlabError, match="lmeval_above_chance"):
        check_claim(experiment, claim, tables, "cpu")


def test_broken_where_is_an_error(tmp_path: Path, tables):
    experiment, claim = one_claim(tmp_path, where="hardware == 'a100'")
    with pytest.raises(GemvlabError, match="lmeval_above_chance"):
        check_claim(experiment, claim, tables, "cpu")


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"threshold": 3}, "threshold"),
        ({"check": None}, "check"),
        ({"check": "~ 3"}, "check"),
        ({"check": "> three"}, "check"),
        ({"scale": "laptop"}, "scale"),
        ({"measure": "acc -"}, "measure"),
        ({"min_rows": 0}, "min_rows"),
        ({"group_by": "model"}, "group_by"),
    ],
)
def test_bad_claims_file_names_file_claim_and_key(tmp_path: Path, overrides: dict, key: str):
    entry = {k: v for k, v in claim_dict(**overrides).items() if v is not None}
    path = write_claims(tmp_path / "claims.yaml", [entry])
    with pytest.raises(GemvlabError) as err:
        load_claims(path)
    message = str(err.value)
    assert str(path) in message and "lmeval_above_chance" in message and key in message


def test_bad_claims_file_structure(tmp_path: Path):
    path = write_claims(tmp_path / "claims.yaml", [claim_dict(), claim_dict()])
    with pytest.raises(GemvlabError, match="duplicate"):
        load_claims(path)
    path.write_text(yaml.safe_dump({"experiment": "baseline", "claim": []}))
    with pytest.raises(GemvlabError, match="claim"):
        load_claims(path)
    with pytest.raises(GemvlabError, match="does not exist"):
        load_claims(tmp_path / "nope.yaml")


def test_render_claims_md(tmp_path: Path, tables):
    experiment, claims = load_claims(
        write_claims(
            tmp_path / "claims.yaml",
            [
                claim_dict(id="a", check=f"> {LOW}", paper="Beats | chance."),
                claim_dict(id="b", check="> 3"),
                claim_dict(id="c", scale="paper"),
            ],
        )
    )
    results = [check_claim(experiment, claim, tables, "cpu") for claim in claims]
    results.append(check_claim("other", claims[0], tables, "cpu"))
    note = "Generated by `python -m gemvlab.stages.claims` from results/tables; do not edit."
    text = render_claims_md(results, note)
    assert text.startswith(f"# Claims\n\n{note}\n")
    sections = re.split(r"^## ", text, flags=re.M)
    assert [s.splitlines()[0] for s in sections[1:]] == ["Summary", "baseline", "other"]
    summary = [line for line in sections[1].splitlines() if line.startswith("| ")][2:]
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    assert summary == [f"| {s} | {n} |" for s, n in counts.items()]
    table = [line for line in sections[2].splitlines() if line.startswith("| ")]
    assert table[0].startswith("| claim id | claim (paper's words) | paper value | our value |")
    assert len(table) == 2 + len(claims)
    assert r"Beats \| chance." in table[2]
    assert all(f"| {r.status} |" in line for r, line in zip(results, table[2:], strict=False))


def test_render_claims_html_matches_the_markdown_page(tmp_path: Path, tables):
    """The report's HTML page: the same rows as CLAIMS.md, the paper's words escaped."""
    experiment, claims = load_claims(
        write_claims(tmp_path / "claims.yaml",
                     [claim_dict(id="a", check=f"> {LOW}", paper="Beats <b>chance</b>."),
                      claim_dict(id="b", check="> 3")]))
    results = [check_claim(experiment, claim, tables, "cpu") for claim in claims]
    page = render_claims_html(results, "Generated; do not edit.")
    frames = pd.read_html(io.StringIO(page))
    summary, rows = frames
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    assert dict(zip(summary["status"], summary["claims"], strict=True)) == counts
    assert list(rows["claim id"]) == ["a", "b"]
    assert list(rows["status"]) == [r.status for r in results]
    assert "Beats &lt;b&gt;chance&lt;/b&gt;." in page and "<b>chance" not in page
    assert '<h2 id="baseline">baseline</h2>' in page
