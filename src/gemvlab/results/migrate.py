"""Re-key committed run records after a config move or a rename, never by rerunning or by hand.

``python -m gemvlab.results.migrate [--results DIR] [--dry-run]``: for every record under
``<results>/runs/<experiment>/<run_id>/``, find the one planned run (same experiment, scale and
stage, the stage under its current name) whose resolved config equals the record's apart from
moved keys, prove it, and move the record to that run's run_id: its config.yaml becomes the
planned config and its provenance gains a ``migrations`` entry saying what moved. Metric values
are never touched; their keys only where a prefix was renamed.

Moves it accepts (the only ones): a per-scale mapping ({smoke: .., cpu: ..}) now holding just
the record's scale's value, a ``<key>_by_scale`` mapping gone beside its ``<key>``, a stage
renamed in ``RENAMED_STAGES`` (the run_id, provenance ``stage`` and config ``experiment.stage``
follow) and a metric prefix (a key's first ``/`` segment) renamed in ``RENAMED_METRICS`` for
the record's stage (metrics.json's keys renamed, values bit-identical; the entry's
``renamed_metrics`` says which prefixes). A record whose only change is a metric rename keeps
its folder and its config.yaml.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from gemvlab.config import REPO_ROOT, PlannedRun, plan_experiment, run_id, scale_names
from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_json, atomic_write_text

# Keys that never enter a run_id, so they are neither compared nor proved.
_BOOKKEEPING = ("logger", "paths", "threads", "hub_online", "hydra", "experiment")

# Stages renamed since records were written: old name -> current name (issue 19).
RENAMED_STAGES: dict[str, str] = {"kv_eval": "kv_evict_eval", "kvq_eval": "kv_quant_eval"}

# Metric prefixes renamed, per stage (current name): old first key segment -> new (issue 19).
RENAMED_METRICS: dict[str, dict[str, str]] = {
    "kv_quant_eval": {"q": "continuation", "pk": "passkey", "mem": "cache"},
    "simulate": {"cal": "calibration", "calsum": "calibration_summary",
                 "calfit": "calibration_fit", "tput": "throughput"},
}


def moves(old: Any, new: Any, scale: str, scales: set[str], where: str = "") -> list[str] | None:
    """The moved keys that turn ``old`` into ``new``, or None if they differ otherwise."""
    if isinstance(old, Mapping) and old and set(old) <= scales and not (
            isinstance(new, Mapping) and set(new) == set(old)):
        if scale not in old:
            return None
        inner = moves(old[scale], new, scale, scales, where)
        return None if inner is None else [f"{where} (per scale -> {scale})", *inner]
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found: list[str] = []
        for key in set(old) | set(new):
            path = f"{where}.{key}".lstrip(".")
            if key not in new:
                base = str(key).removesuffix("_by_scale")
                if base == key or base not in new or not isinstance(old[key], Mapping):
                    return None
                found.append(f"{path} (removed; {base} holds the value)")
                continue
            if key not in old:
                return None
            inner = moves(old[key], new[key], scale, scales, path)
            if inner is None:
                return None
            found += inner
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            inner = moves(a, b, scale, scales, f"{where}[{i}]")
            if inner is None:
                return None
            found += inner
        return found
    return [] if old == new else None


def rename_metrics(metrics: Mapping[str, Any], stage: str) -> tuple[dict[str, Any], list[str]]:
    """``metrics`` with the renamed prefixes of ``stage`` applied (values untouched, order
    kept), and the renames that applied ("old/ -> new/")."""
    renames = RENAMED_METRICS.get(stage, {})
    out: dict[str, Any] = {}
    used: set[str] = set()
    for key, value in metrics.items():
        head, sep, rest = key.partition("/")
        if sep and head in renames:
            used.add(head)
            key = f"{renames[head]}/{rest}"
        if key in out:
            raise GemvlabError(f"metric {key!r} would be written twice: the old and the new "
                               "name of a renamed prefix are both in the record")
        out[key] = value
    return out, [f"{old}/ -> {renames[old]}/" for old in sorted(used)]


def _computed(plain: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plain.items() if k not in _BOOKKEEPING}


def match(record: Mapping[str, Any], stage: str, planned: list[PlannedRun],
          scales: set[str]) -> tuple[PlannedRun, list[str]]:
    """The one planned run of this stage the record's config equals apart from moved keys."""
    scale = record["scale"]["name"]
    found = []
    for run in planned:
        if run.stage != stage:
            continue
        moved = moves(_computed(record), _computed(run.config), scale, scales)
        if moved is not None and record["experiment"]["id"] == run.config["experiment"]["id"]:
            found.append((run, moved))
    if len(found) != 1:
        raise GemvlabError(f"{len(found)} planned runs match this record (stage {stage}, scale "
                           f"{scale}); a migration needs exactly one")
    return found[0]


def _git_sha() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    return proc.stdout.strip() or "unknown"


def migrate(results: Path, dry_run: bool = False) -> list[dict[str, Any]]:
    """Re-key every record under ``results/runs``; returns what it did, record by record."""
    scales = scale_names()
    plans: dict[tuple[str, str], list[PlannedRun]] = {}
    done = []
    for folder in sorted((results / "runs").glob("*/*")):
        if not (folder / "metrics.json").is_file():
            continue
        record = yaml.safe_load((folder / "config.yaml").read_text())
        prov = json.loads((folder / "provenance.json").read_text())
        stage = str(prov.get("stage") or record["experiment"]["stage"])
        if run_id(record, stage) != folder.name:
            raise GemvlabError(f"{folder}: its config hashes to {run_id(record, stage)}, not its "
                               "folder name; it was edited, so it cannot be migrated")
        new_stage = RENAMED_STAGES.get(stage, stage)
        exp, scale = folder.parent.name, record["scale"]["name"]
        if (exp, scale) not in plans:
            plans[exp, scale] = plan_experiment(exp, [f"scale={scale}",
                                                      f"paths.results={results}"])
        run, moved = match(record, new_stage, plans[exp, scale], scales)
        if new_stage != stage:
            moved = [f"stage {stage} -> {new_stage}", *moved]
        old_metrics = json.loads((folder / "metrics.json").read_text())
        metrics, renamed = rename_metrics(old_metrics, new_stage)
        if run.run_id == folder.name and not renamed:
            continue
        target = folder.parent / run.run_id
        if target != folder and target.exists():
            raise GemvlabError(f"{target} exists already: cannot move {folder} there")
        entry = {"experiment": exp, "from_run_id": folder.name, "to_run_id": run.run_id,
                 "moved": moved, **({"renamed_metrics": renamed} if renamed else {})}
        done.append(entry)
        if dry_run:
            continue
        config = {**run.config, **{k: record[k] for k in _BOOKKEEPING[:4] if k in record}}
        prov.setdefault("migrations", []).append({
            **entry, "by": "python -m gemvlab.results.migrate", "git_sha": _git_sha(),
            "at": datetime.now(UTC).isoformat()})
        prov["run_id"] = run.run_id
        prov["stage"] = new_stage
        if target != folder:  # a metrics-only rename leaves the config as it was run
            folder.rename(target)
            atomic_write_text(target / "config.yaml",
                              yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        if renamed:
            atomic_write_json(target / "metrics.json", metrics)
        atomic_write_json(target / "provenance.json", prov)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results folder (default results)")
    parser.add_argument("--dry-run", action="store_true", help="say what would move, move nothing")
    args = parser.parse_args()
    try:
        done = migrate(Path(args.results), args.dry_run)
    except GemvlabError as exc:
        sys.exit(f"gemvlab migrate: error: {exc}")
    for entry in done:
        what = [*entry["moved"], *(f"metrics {r}" for r in entry.get("renamed_metrics", []))]
        print(f"{entry['experiment']}: {entry['from_run_id']} -> {entry['to_run_id']} "
              f"({'; '.join(what)})")
    print(f"{len(done)} record(s) {'would be migrated' if args.dry_run else 'migrated'}")


if __name__ == "__main__":
    main()
