"""The one way a stage runs: compose, check overrides, seed, call the method, write the record."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from gemvlab.config import (
    apply_scale,
    compose_checked,
    conf_dir,
    register_experiments,
    run_id,
    to_plain,
)
from gemvlab.error_line import say, to_caller
from gemvlab.errors import GemvlabError
from gemvlab.paths import check_config_names
from gemvlab.results import provenance, records
from gemvlab.tracking import Tracker

log = logging.getLogger("gemvlab")


@dataclass
class StageContext:
    """What a stage body gets besides its config: where to write and how to log."""

    name: str
    run_dir: Path
    run_id: str
    config: dict
    tracker: Tracker


StageFn = Callable[[DictConfig, StageContext], Mapping[str, float]]


def _user_overrides(argv: list[str]) -> list[str] | None:
    """Overrides to pre-check, or None when Hydra runs in a mode we leave to it (-m, --cfg…)."""
    if any(a.startswith("-") for a in argv):
        return None
    return [a for a in argv if not a.startswith(("hydra.", "+hydra.", "hydra/"))]


# Hydra's flags that take a value (the rest, --run, -m, --resolve, take none).
_VALUED_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                 "-cn", "--config-dir", "-cd", "--experimental-rerun")


def _options_first(argv: list[str]) -> list[str]:
    """Hydra's flags, then every override: argparse takes the overrides as one run of
    positionals, so `x=1 --cfg job` plus the job name appended must become `--cfg job x=1`."""
    options: list[str] = []
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg.startswith("-"):
            options.append(arg)
            if arg in _VALUED_FLAGS:
                options.append(next(args, ""))
        elif options[-1:] in (["--info"], ["-i"]) and "=" not in arg:
            options.append(arg)  # --info's optional value (config, defaults, ...)
        else:
            overrides.append(arg)
    return [*options, *overrides]


def set_determinism(seed: int, threads: int | None) -> None:
    """Seed every generator a run may draw from and fix torch's intra-op threads, so that two
    runs of a config on one machine (provenance's cpu_capability) with one lock and thread
    count give every untimed metric bit for bit (tests/test_determinism.py).

    Not torch.use_deterministic_algorithms: on the CPU it changes only ops that accumulate
    into indexed places (index_put, put_ with accumulate), which gemvlab does not call; it
    imports torch._inductor (1.5-2 s more for every run), and its NaN fill of torch.empty
    would add a memset to the CPU benchmarks' timed loops.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))


def _set_offline(cfg: DictConfig) -> None:
    if not cfg.get("hub_online", False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _check_run_folder(cfg_plain: dict, run_dir: Path, rid: str) -> None:
    """Under results/runs/<experiment>/ a folder name is a run_id; a mismatch means drift."""
    runs_root = Path(cfg_plain["paths"]["results"]).resolve() / "runs"
    if run_dir.resolve().parent.parent == runs_root and run_dir.name != rid:
        raise GemvlabError(f"run folder {run_dir} does not match this config's run_id {rid}: "
                           "let the Snakefile name run folders, or run without hydra.run.dir")


def execute(name: str, body: StageFn, cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Run one stage body and write its record; also the entry used by tests."""
    cfg = apply_scale(cfg)
    _set_offline(cfg)
    plain = to_plain(cfg)
    check_config_names(plain)
    rid = run_id(plain, name)
    _check_run_folder(plain, run_dir, rid)
    run_dir.mkdir(parents=True, exist_ok=True)
    records.begin_record(run_dir)
    set_determinism(int(cfg.seed), cfg.get("threads"))
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    exp = plain.get("experiment", {}).get("id", "adhoc")
    tracker = Tracker(plain["logger"], name=f"{exp}/{name}/{rid}", group=exp, job_type=name,
                      config=plain)
    failed = True
    try:
        metrics = dict(body(cfg, StageContext(name, run_dir, rid, plain, tracker)))
        metrics.setdefault("wall_s", round(time.perf_counter() - t0, 3))
        prov = provenance.collect(int(cfg.seed))
        prov.update(stage=name, run_id=rid, started=started.isoformat(),
                    finished=datetime.now(UTC).isoformat(), wall_s=metrics["wall_s"],
                    argv=sys.argv[1:])
        records.write_record(run_dir, plain, metrics, prov)
        tracker.log_metrics(records.check_metrics(metrics))
        failed = False
    finally:
        tracker.finish(failed=failed)
    log.info("%s: run %s done in %.1f s -> %s", name, rid, metrics["wall_s"], run_dir)
    return metrics


def only_keys(plain: Mapping, keys: set[str] | None) -> dict:
    """The resolved config cut to the top-level ``keys`` (None: all of it)."""
    return dict(plain) if keys is None else {k: v for k, v in plain.items() if k in keys}


def dispatch(name: str) -> StageFn:
    """The body of a run stage: the registered runner its resolved config selects, given only
    the keys it declares it reads (a read of any other key fails: see Runner.reads)."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    from gemvlab.registry import runner_for

    def body(cfg: DictConfig, ctx: StageContext) -> Mapping[str, float]:
        chosen = runner_for(name, ctx.config)
        if chosen.keys_read is None:
            return chosen.run(cfg, ctx)
        seen = only_keys(ctx.config, chosen.keys_read)
        cut = OmegaConf.create(seen)
        OmegaConf.set_struct(cut, True)
        return chosen.run(cut, replace(ctx, config=seen))

    return body


def stage(name: str) -> Callable[[StageFn], Callable[[], None]]:
    """Turn a stage body into a `python -m gemvlab.stages.<name>` entry point (@hydra.main)."""

    def wrap(body: StageFn) -> Callable[[], None]:
        import hydra
        from hydra.core.hydra_config import HydraConfig

        @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
        def _hydra_main(cfg: DictConfig) -> None:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            try:
                execute(name, body, cfg, run_dir)
            except GemvlabError as exc:
                say(f"gemvlab {name}: error: {exc}")
                sys.exit(1)
            except Exception as exc:  # a bug: hydra prints the traceback into the job's log
                what = ": ".join([type(exc).__name__, *str(exc).strip().splitlines()[:1]])
                to_caller(f"gemvlab {name}: failed: {what} (the traceback is in the job's log)")
                raise

        def main() -> None:
            argv = sys.argv[1:]
            checked = _user_overrides(argv)
            if checked is not None:
                try:
                    compose_checked(checked)
                except GemvlabError as exc:
                    say(f"gemvlab {name}: error: {exc}")
                    sys.exit(2)
            sys.argv = [sys.argv[0], *_options_first(argv), f"hydra.job.name={name}"]
            register_experiments()
            _hydra_main()

        return main

    return wrap
