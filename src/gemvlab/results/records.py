"""Run records: config.yaml, provenance.json, then metrics.json, each written atomically.

metrics.json is written last and marks the record complete; a run killed before that leaves
no metrics.json, so nothing that looks complete.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import yaml

from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_json, atomic_write_text

METRICS = "metrics.json"


def check_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """Metrics are flat finite numbers; NaN or inf means the run went wrong."""
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GemvlabError(f"metric '{key}' is {value!r}, not a number: stages report numbers")
        if not math.isfinite(value):
            raise GemvlabError(f"metric '{key}' is {value}: the model or method produced "
                               "non-finite values; the run record was not written")
        clean[key] = value
    return clean


def begin_record(run_dir: Path) -> None:
    """Forget an earlier result before a rerun, so a killed rerun cannot look complete."""
    (run_dir / METRICS).unlink(missing_ok=True)


def write_record(run_dir: Path, config: Mapping, metrics: Mapping[str, object],
                 provenance: Mapping) -> None:
    clean = check_metrics(metrics)
    atomic_write_text(run_dir / "config.yaml",
                      yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True))
    atomic_write_json(run_dir / "provenance.json", provenance)
    atomic_write_json(run_dir / METRICS, clean)

