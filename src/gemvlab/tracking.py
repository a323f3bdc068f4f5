"""wandb behind one small interface, offline by default, so runs never need the network."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


class Tracker:
    """One wandb run per stage run; a no-op when logger.kind is none or mode is disabled."""

    def __init__(self, logger_cfg: Mapping[str, Any], *, name: str, group: str, job_type: str,
                 config: Mapping[str, Any]) -> None:
        self._run = None
        if logger_cfg.get("kind") != "wandb" or logger_cfg.get("mode") == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; tracking is off (logger=none silences this)")
            return
        run_dir = Path(logger_cfg["dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=logger_cfg.get("project", "gemvlab"),
                               entity=logger_cfg.get("entity"), mode=logger_cfg["mode"],
                               dir=str(run_dir), name=name, group=group, job_type=job_type,
                               config=dict(config), reinit="finish_previous",
                               settings=wandb.Settings(silent=True, console="off"))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(metrics))
            self._run.log(dict(metrics))

    def log_step(self, metrics: Mapping[str, float], step: int) -> None:
        """One point of a curve (a training loss per step), not a summary value."""
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def log_table(self, name: str, df: pd.DataFrame, files: list[Path]) -> None:
        if self._run is None:
            return
        import wandb

        self._run.log({name: wandb.Table(dataframe=df.astype(object).where(df.notna(), None))})
        artifact = wandb.Artifact(name=name.replace("/", "-"), type="table")
        for path in files:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact)

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
