"""wandb tracking: offline runs land in the results folder, logger=none does nothing."""

from __future__ import annotations

import pandas as pd

from gemvlab.tracking import Tracker


def test_offline_run_writes_locally_with_table(tmp_path):
    cfg = {"kind": "wandb", "mode": "offline", "project": "gemvlab-test", "entity": None,
           "dir": str(tmp_path / "wandb")}
    tracker = Tracker(cfg, name="baseline/demo/abc", group="baseline", job_type="demo",
                      config={"seed": 1})
    tracker.log_metrics({"ppl": 12.5})
    csv = tmp_path / "t.csv"
    df = pd.DataFrame({"model": ["a", "b"], "ppl": [1.0, float("nan")]})
    df.to_csv(csv, index=False)
    tracker.log_table("baseline/t", df, [csv])
    tracker.finish()
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


def test_logger_none_and_disabled_do_nothing(tmp_path):
    for cfg in ({"kind": "none"}, {"kind": "wandb", "mode": "disabled", "dir": str(tmp_path)}):
        tracker = Tracker(cfg, name="x", group="g", job_type="j", config={})
        tracker.log_metrics({"a": 1.0})
        tracker.finish()
    assert not list(tmp_path.iterdir())
