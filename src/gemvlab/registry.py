"""Runners: the code a stage runs for one kind of run, registered next to the method it calls.

A method family declares its runners in its own ``runs.py`` with :func:`runner`; the stage
dispatcher (``python -m gemvlab.stages <stage>``), the Workflow and the rules find them here, so
stages, rules and the Workflow never name a paper. What a run needs (files, a GPU, artifacts a
stage of their own makes first) is declared by its runner as functions of the resolved config.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gemvlab.errors import GemvlabError

Plain = Mapping[str, Any]

# Top-level config keys every run reads (its scale, seed and where it writes), whatever it runs.
ALWAYS_READ = ("experiment", "scale", "seed", "threads", "paths", "logger", "hub_online",
               "report", "hydra")

# Metrics every run's record has that read the clock (stage.execute adds wall_s): see Runner.
ALWAYS_TIMED = ("wall_s",)
# What a run that loads a model and evaluates it measures besides its results: load and
# evaluation times, and the process's peak memory.
MODEL_RUN_TIMED = ("load_s", "perplexity_s", "lm_eval_s", "peak_rss_mb")


@dataclass(frozen=True)
class Artifact:
    """A resource a run needs that a stage makes first, once per settings (e.g. codebooks).

    The stage runs with the needing run's overrides and writes into ``folder`` (its run record
    too); ``file`` is what marks it done. What the stage itself needs comes from its own runner.
    """

    stage: str
    folder: str
    file: str
    threads: int = 1
    mem_mb: int = 8000
    runtime_min: int = 60

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.file}"


def _always(_plain: Plain) -> bool:
    return True


def _scale_device_is_cuda(plain: Plain) -> bool:
    return plain["scale"]["device"] == "cuda"


def _nothing(_plain: Plain) -> list:
    return []


@dataclass(frozen=True)
class Runner:
    """One stage's code for runs whose resolved config ``applies`` says are its own.

    ``uses_model``: the run loads ``model`` and reads ``eval.datasets``, so the Workflow makes
    them first (and plans a hub model only online). ``inputs``: other files it reads;
    ``artifacts``: resources a stage of their own makes first; ``needs_gpu``: whether it runs on
    a CUDA GPU (default: where the scale puts models). ``reads``: the top-level config keys the
    run reads besides :data:`ALWAYS_READ` (None: all of them); a global override of any other
    key does not reach its runs, and the run body sees only these keys, so a key read without
    being declared fails at once instead of leaving a record that an override never changed.
    ``timed``: glob patterns (fnmatch: ``*`` spans ``/``) of the metric keys that are readings of
    the clock or of memory use (wall times, latencies, rates and ratios of them, peak memory),
    besides :data:`ALWAYS_TIMED`. Every other metric is a result: two runs of the same config
    on the same machine, lock and thread count must give it bit for bit
    (tests/test_determinism.py), and the tables' ``timed:`` lists must agree with these.
    """

    stage: str
    kind: str
    run: Callable[..., Mapping[str, float]]
    applies: Callable[[Plain], bool] = _always
    uses_model: bool = True
    inputs: Callable[[Plain], list[str]] = _nothing
    artifacts: Callable[[Plain], list[Artifact]] = _nothing
    needs_gpu: Callable[[Plain], bool] = _scale_device_is_cuda
    reads: tuple[str, ...] | None = None
    timed: tuple[str, ...] = ()

    def is_timed(self, key: str) -> bool:
        """Whether metric ``key`` of this runner's records is a clock or memory reading."""
        return any(fnmatch.fnmatchcase(key, pattern)
                   for pattern in (*ALWAYS_TIMED, *self.timed))

    @property
    def keys_read(self) -> set[str] | None:
        """The top-level config keys this runner's runs read (None: every key)."""
        return None if self.reads is None else set(ALWAYS_READ) | set(self.reads)


_RUNNERS: dict[tuple[str, str], Runner] = {}
_LOADED = False


def runner(stage: str, kind: str, **declared: Any) -> Callable[[Callable], Callable]:
    """Register the decorated stage body ``(cfg, ctx) -> metrics`` as ``stage``'s ``kind``."""

    def register(body: Callable) -> Callable:
        key = (stage, kind)
        known = _RUNNERS.get(key)
        if known is not None and known.run.__qualname__ != body.__qualname__:
            raise GemvlabError(f"two runners claim stage {stage!r} kind {kind!r}: "
                               f"{known.run.__module__} and {body.__module__}")
        _RUNNERS[key] = Runner(stage, kind, body, **declared)
        return body

    return register


def load_runners() -> dict[tuple[str, str], Runner]:
    """Import every ``gemvlab.<family>[.<sub>].runs`` module once, so each registers itself."""
    global _LOADED
    if not _LOADED:
        import gemvlab

        for info in pkgutil.walk_packages(gemvlab.__path__, "gemvlab."):
            if info.name.rsplit(".", 1)[-1] == "runs":
                importlib.import_module(info.name)
        _LOADED = True
    return _RUNNERS


def stages() -> list[str]:
    """Every stage some runner serves."""
    return sorted({stage for stage, _ in load_runners()})


def runner_for(stage: str, plain: Plain) -> Runner:
    """The one runner of ``stage`` that takes this resolved config."""
    candidates = [r for (s, _), r in load_runners().items() if s == stage]
    if not candidates:
        raise GemvlabError(f"no runner serves stage {stage!r}: use one of {', '.join(stages())}")
    chosen = [r for r in candidates if r.applies(plain)]
    if len(chosen) != 1:
        kinds = ", ".join(sorted(r.kind for r in candidates))
        found = "none" if not chosen else ", ".join(sorted(r.kind for r in chosen))
        raise GemvlabError(f"stage {stage!r} has runners for {kinds}; this config matches "
                           f"{found}: check the experiment's stage and its bench/method group")
    return chosen[0]
