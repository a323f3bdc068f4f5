"""Config composition shared by the stages and the Snakefile, so both agree on every run_id."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gemvlab.errors import GemvlabError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENTS_DIR = REPO_ROOT / "experiments"

# Keys that do not change what a run computes, so they stay out of its run_id.
_NOT_IN_RUN_ID = ("logger", "paths", "threads", "hub_online")
_EXPERIMENT_KEYS_IN_RUN_ID = ("id",)


def sanitize(value: str) -> str:
    """Turn a hub id such as org/name into a folder-safe model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", str(value))


if not OmegaConf.has_resolver("sanitize"):
    OmegaConf.register_new_resolver("sanitize", sanitize)


def conf_dir() -> Path:
    if not (CONF_DIR / "config.yaml").is_file():
        raise GemvlabError(f"config tree not found at {CONF_DIR}: install gemvlab editable "
                           "from its repository (bash scripts/setup.sh)")
    return CONF_DIR


@cache
def register_experiments() -> None:
    """Offer each experiments/<id>/ to Hydra (gemvlab.experiment_source), once per process."""
    from gemvlab.experiment_source import register

    register(EXPERIMENTS_DIR, conf_dir())


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the root config with overrides, outside @hydra.main (Snakefile, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gemvlab.hydra_errors import explain

    register_experiments()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as exc:  # hydra raises several types; all become one clear line
        raise GemvlabError(explain(exc, overrides)) from exc
    finally:
        GlobalHydra.instance().clear()
    return apply_scale(cfg)


def compose_checked(overrides: Sequence[str] = ()) -> DictConfig:
    """compose, and refuse a value of the wrong type for its key (seed=abc) now, before any
    job starts: each plain key=value override against the config composed without them."""
    from gemvlab.override_types import check_types, value_overrides

    cfg = compose(overrides)
    values = value_overrides(overrides, cfg)
    if values:
        kept = [o for o in overrides if o not in values.values()]
        check_types(values, compose(kept), cfg)
    return cfg


def scale_names() -> set[str]:
    return {p.stem for p in (conf_dir() / "scale").glob("*.yaml")}


def select_scale(node: Any, scale: str, scales: set[str], where: str = "") -> Any:
    """``node`` with every per-scale mapping ({smoke: .., cpu: .., gpu: .., paper: ..}, keys
    all scale names) replaced by the value of ``scale``: the one way to give a setting per
    scale, and only the value a run uses reaches its config and run_id."""
    if isinstance(node, Mapping):
        if node and set(node) <= scales:
            if scale not in node:
                raise GemvlabError(f"{where or 'the config'} gives values for scales "
                                   f"{sorted(node)} but none for {scale}: add {scale}: <value>")
            return select_scale(node[scale], scale, scales, where)
        return {k: select_scale(v, scale, scales, f"{where}.{k}".lstrip("."))
                for k, v in node.items()}
    if isinstance(node, list):
        return [select_scale(v, scale, scales, where) for v in node]
    return node


def apply_scale(cfg: DictConfig) -> DictConfig:
    """The composed config with its per-scale settings resolved for ``scale.name`` (what every
    stage and the planner see; interpolations stay as they are)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    scaled = OmegaConf.create(select_scale(plain, str(cfg.scale.name), scale_names()))
    OmegaConf.set_struct(scaled, bool(OmegaConf.is_struct(cfg)))
    return scaled


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain data (what config.yaml of a run record holds)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except Exception as exc:
        raise GemvlabError(f"config does not resolve: {exc}".splitlines()[0]) from exc


def run_id(plain_cfg: Mapping, stage: str) -> str:
    """Short hash of everything that changes a run's result: same config, same folder."""
    kept = {k: v for k, v in plain_cfg.items() if k not in _NOT_IN_RUN_ID and k != "hydra"}
    kept["stage"] = stage
    exp = plain_cfg.get("experiment") or {}
    kept["experiment"] = {k: exp.get(k) for k in _EXPERIMENT_KEYS_IN_RUN_ID}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


@dataclass(frozen=True)
class PlannedRun:
    experiment: str
    stage: str
    run_id: str
    overrides: tuple[str, ...]
    config: dict
    # Global overrides left out because the run does not read the key they set.
    unread: tuple[str, ...] = ()


# What a run reads, by its stage and resolved config: top-level keys, or None for all.
ReadKeys = Callable[[str, dict], "set[str] | None"]


def override_root(override: str) -> str:
    """The top-level config key an override sets: ``eval`` for ``eval.lm_eval.limit=5``,
    ``model`` for ``model=gemma3-270m``, the package for ``group@package=option``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(override)
    return re.split(r"[./]", parsed.package or parsed.key_or_group)[0]


def unread_overrides(overrides: Sequence[str], keys: set[str] | None) -> tuple[str, ...]:
    """The overrides that set a key outside ``keys`` (none when ``keys`` is None: reads all)."""
    if keys is None:
        return ()
    return tuple(o for o in overrides if override_root(o) not in keys)


def expand_grid(grid: Mapping[str, Sequence]) -> list[tuple[str, ...]]:
    keys = list(grid)
    values = [v if isinstance(v, list | tuple) else [v] for v in (grid[k] for k in keys)]
    return [tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True))
            for combo in itertools.product(*values)]


def plan_experiment(experiment: str, extra: Sequence[str] = (), user: Sequence[str] = (),
                    reads: ReadKeys | None = None) -> list[PlannedRun]:
    """Every run an experiment declares, resolved: the DAG's leaves and the tables' rows.
    ``extra`` reaches every run; ``user`` (global overrides) only the runs that ``reads`` says
    read the key each sets, so an override of ``eval`` leaves a simulation's run_id alone (and
    one of a key the experiment does not have, such as ``hw`` for an evaluation, no run).
    Plans are cached on disk (gemvlab.plan_cache) under a key of everything they depend on."""
    from gemvlab import plan_cache

    folder = plan_cache.cache_dir(REPO_ROOT)
    cacheable = folder is not None and _from_gemvlab(reads)
    if cacheable:
        args = {"experiment": experiment, "extra": list(extra), "user": list(user),
                "reads": reads and f"{reads.__module__}.{reads.__qualname__}"}
        key = plan_cache.plan_key(args, [conf_dir(), EXPERIMENTS_DIR],
                                  Path(__file__).resolve().parent)
        cached = plan_cache.load(folder, key, _runs_hash_to_their_ids)
        if cached is not None:
            return [_planned_run(run) for run in cached]
    runs = _plan_experiment(experiment, extra, user, reads)
    if cacheable:
        plan_cache.store(folder, key, [_plain_run(run) for run in runs])
    return runs


def _from_gemvlab(reads: ReadKeys | None) -> bool:
    """Whether what decides a plan is all gemvlab's source (in the cache key): ``reads`` and
    every registered runner (a test may register its own)."""
    if reads is None:
        return True
    from gemvlab.registry import load_runners

    modules = [reads.__module__, *(r.run.__module__ for r in load_runners().values())]
    return all(m.startswith("gemvlab.") for m in modules)


def _plain_run(run: PlannedRun) -> dict:
    return {"experiment": run.experiment, "stage": run.stage, "run_id": run.run_id,
            "overrides": list(run.overrides), "config": run.config, "unread": list(run.unread)}


def _planned_run(run: dict) -> PlannedRun:
    return PlannedRun(run["experiment"], run["stage"], run["run_id"], tuple(run["overrides"]),
                      run["config"], tuple(run["unread"]))


def _runs_hash_to_their_ids(runs: list[dict]) -> bool:
    try:
        return all(run_id(run["config"], run["stage"]) == run["run_id"] for run in runs)
    except (KeyError, TypeError, AttributeError):
        return False


def _plan_experiment(experiment: str, extra: Sequence[str], user: Sequence[str],
                     reads: ReadKeys | None) -> list[PlannedRun]:
    keys = set(to_plain(compose([f"experiment={experiment}", *extra])))
    absent = unread_overrides(user, keys)
    user = [o for o in user if o not in absent]
    base = compose_checked([f"experiment={experiment}", *extra, *user])
    # Resolved, so a grid may take its values from the config (a model list by scale).
    grids = OmegaConf.to_container(base.experiment.runs, resolve=True)
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for grid in grids:
        for combo in expand_grid(grid):
            overrides = (f"experiment={experiment}", *combo, *extra, *user)
            plain = to_plain(compose(overrides))
            stage = plain["experiment"]["stage"]
            unread = unread_overrides(user, reads(stage, plain)) if user and reads else ()
            if unread:
                kept = [o for o in user if o not in unread]
                overrides = (f"experiment={experiment}", *combo, *extra, *kept)
                plain = to_plain(compose(overrides))
            rid = run_id(plain, stage)
            if rid in seen:
                continue
            seen.add(rid)
            runs.append(PlannedRun(experiment, stage, rid, overrides, plain, absent + unread))
    return runs


def experiment_ids() -> list[str]:
    """The folders of experiments/ that declare an experiment."""
    return sorted(p.parent.name for p in EXPERIMENTS_DIR.glob("*/experiment.yaml"))
