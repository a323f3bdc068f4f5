"""The Snakefile's view of the pipeline: which runs exist, where they write, what they need.

Kept in Python (not in the Snakefile) so that the DAG's planning is testable and the
Snakefile stays a thin list of rules.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from snakemake.io import ancient

from gemvlab.config import (
    CONF_DIR,
    PlannedRun,
    experiment_ids,
    override_root,
    plan_experiment,
)
from gemvlab.errors import GemvlabError
from gemvlab.registry import Artifact, Runner, runner_for

# A run job's resources where its experiment does not set them (job_mem_mb, job_runtime_min).
DEFAULT_MEM_MB = 8000
DEFAULT_RUNTIME_MIN = 60


CONFIG_SCHEMA = CONF_DIR / "workflow.schema.yaml"


def check_config(config: Mapping[str, Any]) -> None:
    """Refuse a --config mistake in one line naming the valid choices: an unknown key (the
    schema's properties), a wrong type, an unknown scale or experiment, an experiment picked
    by an override (Hydra's own message would say experiment=, not experiments=)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())
    keys = list(schema["properties"])
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise GemvlabError(f"--config {', '.join(unknown)}: unknown key; use {', '.join(keys)}")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema)
                                             .iter_errors(dict(config)))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise GemvlabError(f"--config {where}: {error.message}")
    scales = sorted(p.stem for p in (CONF_DIR / "scale").glob("*.yaml"))
    if "scale" in config and str(config["scale"]) not in scales:
        raise GemvlabError(f"--config scale={config['scale']}: unknown scale; use one of "
                           f"{', '.join(scales)}")
    known = experiment_ids()
    asked = [e for e in str(config.get("experiments", "")).split(",") if e]
    wrong = [e for e in asked if e not in known]
    if wrong:
        raise GemvlabError(f"--config experiments={','.join(wrong)}: unknown experiment; use "
                           f"one or more of {', '.join(known)} (comma-separated)")
    picked = [o for o in shlex.split(str(config.get("overrides", "")))
              if o.lstrip("+~").startswith("experiment=")]
    if picked:
        raise GemvlabError(f"--config overrides: {picked[0]} would give every run one experiment;"
                           f" choose them with --config experiments=<id>[,<id>...], one or more "
                           f"of {', '.join(known)}")


def runner_of(run: PlannedRun) -> Runner:
    return runner_for(run.stage, run.config)


def keys_read(stage: str, plain: dict) -> set[str] | None:
    """The top-level config keys a run of ``stage`` reads, as its runner declares."""
    return runner_for(stage, plain).keys_read


def needs_gpu(run: PlannedRun) -> bool:
    """Whether a run needs a CUDA GPU, as its runner declares."""
    return runner_of(run).needs_gpu(run.config)


def hub_offline(run: PlannedRun) -> bool:
    """Whether a run loads a hub model while the hub is off (hub_online=false)."""
    return bool(runner_of(run).uses_model and run.config["model"].get("source") == "hub"
                and not run.config.get("hub_online"))


def cuda_missing(run: PlannedRun) -> bool:
    """Whether a run needs a CUDA GPU that this machine lacks."""
    if not needs_gpu(run):
        return False
    import torch

    return not torch.cuda.is_available()


def not_here(run: PlannedRun) -> str | None:
    """Why this machine cannot run ``run`` (None: it can), in the words the drift table uses."""
    if hub_offline(run):
        return "needs hub_online=true"
    return "needs CUDA" if cuda_missing(run) else None


def _regex(values: set[str]) -> str:
    """A regex matching exactly these strings (never-matching if none)."""
    import re

    return "|".join(re.escape(v) for v in sorted(values)) if values else "(?!x)x"


def _quote(items: list[str] | tuple[str, ...]) -> str:
    return " ".join(shlex.quote(i) for i in items)


@dataclass
class Workflow:
    scale: str
    results: str
    resources: str
    common: list[str]
    experiments: list[str]
    # Where `snakemake verify` reruns the plan's runs (never the results folder itself).
    verify_results: str
    # The --config this workflow was given, so that the report's own snakemake sees the same DAG.
    config_args: list[str] = field(default_factory=list)
    plan: dict[str, list[PlannedRun]] = field(default_factory=dict)
    # The environment's interpreter, the same path whether snakemake ran as a script or -m.
    python: str = os.path.join(sys.prefix, "bin", "python")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Workflow:
        """Snakemake --config keys: scale, experiments, overrides, results, resources."""
        check_config(config)
        scale = str(config.get("scale", "cpu"))
        results = str(config.get("results") or ("results" if scale == "cpu"
                                                 else f"results/{scale}"))
        resources = str(config.get("resources", "resources"))
        verify = str(config.get("verify_results") or f"{results}/verify")
        if os.path.abspath(verify) == os.path.abspath(results):
            raise GemvlabError(f"--config verify_results={verify}: that is the results folder; "
                               "verify reruns into a folder of its own (default "
                               "<results>/verify)")
        user = shlex.split(str(config.get("overrides", "")))
        fixed = [f"scale={scale}", f"paths.results={results}", f"paths.resources={resources}"]
        experiments = [e for e in str(config.get("experiments", "")).split(",") if e]
        wf = cls(scale, results, resources, [*fixed, *user], experiments or experiment_ids(),
                 verify_results=verify, config_args=[f"{k}={v}" for k, v in config.items()])
        wf.plan = {exp: [run for run in plan_experiment(exp, fixed, user, keys_read)
                         if wf.can_run(run)]
                   for exp in wf.experiments}
        wf.check_overrides_reach(user)
        for line in wf.notes():
            print(f"gemvlab: {line}", file=sys.stderr)
        return wf

    def check_overrides_reach(self, user: list[str]) -> None:
        """A global override must set a key that some planned run has: one that none has is a
        typo, not an override that happens to reach no run."""
        roots = {k for plan in self.plan.values() for run in plan for k in run.config}
        for override in user:
            if override_root(override) not in roots:
                raise GemvlabError(f"--config overrides: {override} sets "
                                   f"'{override_root(override)}', a key no planned run has: "
                                   f"check its spelling (keys: {', '.join(sorted(roots))})")

    def _stale_records(self, exp: str, plan: list[PlannedRun]) -> list[str]:
        """One line when some of an experiment's records were made by code that has changed
        since, or before records named their code: their numbers may not be today's."""
        import json

        from gemvlab.results.source import code_changed

        digests: dict[str, str] = {}
        states = []
        for run in plan:
            folder = Path(self.results, "runs", exp, run.run_id)
            if (folder / "metrics.json").is_file() and (folder / "provenance.json").is_file():
                prov = json.loads((folder / "provenance.json").read_text())
                states.append(code_changed(prov, digests=digests))
        changed, unnamed = states.count(True), states.count(None)
        if not changed and not unnamed:
            return []
        return [f"{exp}: of its {len(states)} records, {changed} were made by code that has "
                f"changed since and {unnamed} before records named their code; to refresh one, "
                "rm its metrics.json and rerun snakemake"]

    def notes(self) -> list[str]:
        """What the plan leaves out that a user would otherwise not see: global overrides that
        some runs do not read (one line per experiment), and records on disk that no planned
        run names any more (one line each: their rows leave the tables, their claims say
        "record missing")."""
        lines = []
        for exp, plan in self.plan.items():
            skipped = sorted({o for run in plan for o in run.unread})
            if skipped:
                n = sum(1 for run in plan if run.unread)
                lines.append(f"{exp}: {n} of its {len(plan)} runs do not read what "
                             f"{' '.join(skipped)} sets; they keep their configs and run_ids")
            lines += self._stale_records(exp, plan)
            planned = {run.run_id for run in plan}
            for record in sorted(Path(self.results, "runs", exp).glob("*/metrics.json")):
                if record.parent.name not in planned:
                    lines.append(f"{record.parent} is not in this plan (no planned run has its "
                                 "config): its rows leave the tables of this run")
        return lines

    def can_run(self, run: PlannedRun) -> bool:
        """Plan a run only where it can run, or when its record exists already.

        A run that needs a CUDA GPU at a CPU scale (a GPU benchmark) waits for a machine with
        one, and a hub model for hub_online=true; so a CPU machine keeps committed GPU results
        in its tables without trying to redo them, and an offline one leaves the hub's models
        out. At a GPU scale the user asked for the GPU: every run is planned.
        """
        if os.path.isfile(f"{self.results}/runs/{run.experiment}/{run.run_id}/metrics.json"):
            return True
        if hub_offline(run):
            return False
        return run.config["scale"]["device"] == "cuda" or not cuda_missing(run)

    @property
    def targets(self) -> list[str]:
        """Everything the default job makes, listed in full: Snakemake (since 7.7) does not
        rerun for a missing intermediate file once the final one exists, so a new experiment or
        a deleted run record would otherwise go unnoticed behind an existing CLAIMS.md."""
        runs = [f"{self.results}/runs/{exp}/{r.run_id}/metrics.json"
                for exp, plan in self.plan.items() for r in plan]
        tables = [f"{self.results}/tables/{exp}" for exp in self.experiments]
        return [*runs, *tables, f"{self.results}/CLAIMS.md", self.report_file]

    @property
    def all_experiments(self) -> list[str]:
        return experiment_ids()

    def _report_path(self, kind: str) -> str:
        """<results>/<kind>.html for every experiment, else a name that says which, so a partial
        plan never replaces the whole project's report."""
        if sorted(self.experiments) == self.all_experiments:
            return f"{self.results}/{kind}.html"
        return f"{self.results}/{kind}-{'-'.join(self.experiments)}.html"

    @property
    def report_file(self) -> str:
        """Snakemake's report of the planned experiments (report.html, report-<ids>.html)."""
        return self._report_path("report")

    @property
    def verify_report_file(self) -> str:
        """Snakemake's report of `snakemake verify`: the drift tables (report-verify.html)."""
        return self._report_path("report-verify")

    @cached_property
    def not_rerun(self) -> dict[tuple[str, str], str]:
        """The planned runs that `snakemake verify` cannot rerun on this machine, with why
        (a committed GPU record on a CPU machine: "needs CUDA")."""
        return {key: why for key, run in self.runs.items() if (why := not_here(run))}

    def fresh_records(self, exp: str) -> list[str]:
        """The fresh records of an experiment's runs that this machine can rerun."""
        return [f"{self.verify_results}/runs/{exp}/{r.run_id}/metrics.json"
                for r in self.plan[exp] if (exp, r.run_id) not in self.not_rerun]

    def verify_metrics(self, wildcards: Any) -> list[str]:
        return self.fresh_records(wildcards.experiment)

    @property
    def verify_targets(self) -> list[str]:
        """What `snakemake verify` makes, listed in full (see targets): the fresh records, so
        that deleting them reruns them, each experiment's drift table, and their report."""
        fresh = [f for exp in self.experiments for f in self.fresh_records(exp)]
        drift = [f"{self.results}/drift/{exp}.{ext}" for exp in self.experiments
                 for ext in ("csv", "md")]
        return [*fresh, *drift, self.verify_report_file]

    @cached_property
    def lock_sha256(self) -> str:
        """The sha256 of requirements.lock ("none" without one), which the tables show each
        record's lock against."""
        from gemvlab.results.source import lock_hash

        return lock_hash() or "none"

    @property
    def drift_tables(self) -> list[str]:
        """Each planned experiment's drift table (what `snakemake verify` checks last)."""
        return [f"{self.results}/drift/{exp}.csv" for exp in self.experiments]

    def drift_args(self, wildcards: Any) -> str:
        """The drift stage's view of a verify: the plan's runs, the folder they were rerun
        into, and those left out with why, as [run_id, reason] pairs."""
        exp = wildcards.experiment
        left = ",".join(f'["{rid}","{why}"]' for (e, rid), why in self.not_rerun.items()
                        if e == exp)
        return _quote([f"report.run_ids=[{self.run_id_list(wildcards)}]",
                       f"+report.fresh_results={self.verify_results}",
                       f"+report.not_rerun=[{left}]"])

    @property
    def results_folders(self) -> str:
        """A regex of the folders the run rules write into: the results and verify's."""
        return _regex({self.results, self.verify_results})

    @property
    def runs(self) -> dict[tuple[str, str], PlannedRun]:
        return {(r.experiment, r.run_id): r for runs in self.plan.values() for r in runs}

    @property
    def common_args(self) -> str:
        return _quote(self.common)

    @property
    def fetch_args(self) -> str:
        """Fetching ignores scale and results, so changing them never refetches a model."""
        return _quote([f"paths.resources={self.resources}"])

    @property
    def stages(self) -> list[str]:
        """The stages of the planned runs: one rule each."""
        return sorted({run.stage for run in self.runs.values()})

    def run_ids_of(self, stage: str) -> str:
        """A regex matching exactly the run_ids of one stage."""
        return _regex({rid for (_, rid), run in self.runs.items() if run.stage == stage})

    def run_inputs(self, wildcards: Any) -> list[str]:
        return self.inputs_of(self.runs[(wildcards.experiment, wildcards.run_id)], None)

    def inputs_of(self, run: PlannedRun, stage: str | None) -> list[str]:
        """What a run (or, with ``stage``, one of its artifacts) reads, as its runner declares:
        the model and the eval datasets when it uses a model, other files, and the files of
        the artifacts made for it first."""
        plain = run.config
        runner = runner_for(stage or run.stage, plain)
        needs = []
        if runner.uses_model:
            # ancient(): a fetch is named by its config (in the run_id) and sha256-checked at
            # every load, so a fresh fetch of the same model never makes a record stale.
            needs.append(ancient(f"{self.resources}/models/{plain['model']['name']}/"
                                 "manifest.json"))
            needs += [ancient(f"{self.resources}/data/{d}/manifest.json")
                      for d in plain.get("eval", {}).get("datasets", [])]
        needs += runner.inputs(plain)
        needs += [a.path for a in runner.artifacts(plain)]
        return needs

    @cached_property
    def artifacts(self) -> dict[str, tuple[Artifact, PlannedRun]]:
        """Every artifact the planned runs need, directly or through another artifact, by its
        file, with a run that needs it (its overrides make it)."""
        found: dict[str, tuple[Artifact, PlannedRun]] = {}
        for run in self.runs.values():
            todo = list(runner_of(run).artifacts(run.config))
            while todo:
                art = todo.pop()
                if art.path not in found:
                    found[art.path] = (art, run)
                    todo += runner_for(art.stage, run.config).artifacts(run.config)
        return found

    @property
    def artifact_stages(self) -> list[str]:
        return sorted({art.stage for art, _ in self.artifacts.values()})

    def artifact_folders_of(self, stage: str) -> str:
        """A regex matching exactly the folders of one stage's artifacts."""
        return _regex({a.folder for a, _ in self.artifacts.values() if a.stage == stage})

    def artifact_file(self, stage: str) -> str:
        """The file that marks one stage's artifacts done: the same for all of them."""
        files = {a.file for a, _ in self.artifacts.values() if a.stage == stage}
        if len(files) != 1:
            raise ValueError(f"artifacts of stage {stage} must share one file name: {files}")
        return files.pop()

    def _artifact(self, wildcards: Any) -> tuple[Artifact, PlannedRun]:
        return next(found for found in self.artifacts.values()
                    if found[0].folder == wildcards.folder)

    def artifact_inputs(self, wildcards: Any) -> list[str]:
        art, run = self._artifact(wildcards)
        return self.inputs_of(run, art.stage)

    def artifact_args(self, wildcards: Any) -> str:
        return _quote(self._artifact(wildcards)[1].overrides)

    def artifact_threads(self, wildcards: Any) -> int:
        return self._artifact(wildcards)[0].threads

    def artifact_mem_mb(self, wildcards: Any) -> int:
        return self._artifact(wildcards)[0].mem_mb

    def artifact_runtime(self, wildcards: Any) -> int:
        return self._artifact(wildcards)[0].runtime_min

    def artifact_gpus(self, wildcards: Any) -> int:
        """An artifact's stage runs where its runner says (collection: where the run does)."""
        art, run = self._artifact(wildcards)
        return int(runner_for(art.stage, run.config).needs_gpu(run.config))

    def run_args(self, wildcards: Any) -> str:
        """A run's overrides, with paths.results the folder it writes into (verify's, for a
        rerun; paths stay out of the run_id)."""
        own = f"paths.results={self.results}"
        return _quote([f"paths.results={wildcards.results}" if o == own else o
                       for o in self.runs[(wildcards.experiment, wildcards.run_id)].overrides])

    def run_threads(self, wildcards: Any) -> int:
        """A job's threads: experiment.job_threads where the experiment sets it (then several
        jobs share the cores), else every core (snakemake caps it at --cores)."""
        run = self.runs[(wildcards.experiment, wildcards.run_id)]
        return int(run.config["experiment"].get("job_threads") or os.cpu_count() or 1)

    def run_mem_mb(self, wildcards: Any) -> int:
        """A job's host memory (Slurm's --mem): experiment.job_mem_mb, set from measured peaks."""
        run = self.runs[(wildcards.experiment, wildcards.run_id)]
        return int(run.config["experiment"].get("job_mem_mb") or DEFAULT_MEM_MB)

    def run_runtime(self, wildcards: Any) -> int:
        """A job's wall-time limit in minutes (Slurm's --time): experiment.job_runtime_min."""
        run = self.runs[(wildcards.experiment, wildcards.run_id)]
        return int(run.config["experiment"].get("job_runtime_min") or DEFAULT_RUNTIME_MIN)

    def run_gpus(self, wildcards: Any) -> int:
        return int(needs_gpu(self.runs[(wildcards.experiment, wildcards.run_id)]))

    @property
    def report_args(self) -> str:
        return _quote(["--config", *self.config_args] if self.config_args else [])

    def run_dir(self, wildcards: Any) -> str:
        return f"{wildcards.results}/runs/{wildcards.experiment}/{wildcards.run_id}"

    def model_args(self, wildcards: Any) -> str:
        """The model overrides of a run that uses this model (packaged, hub, local, random),
        with the model option named even where the run takes the default: the fetch rule's
        params must not depend on which experiments are planned, or Snakemake refetches."""
        for run in self.runs.values():
            if run.config["model"]["name"] == wildcards.model:
                args = [o for o in run.overrides if o.startswith(("model=", "model."))]
                if not any(o.startswith("model=") for o in args):
                    args.insert(0, f"model={wildcards.model}")
                return _quote(args)
        raise KeyError(f"no planned run uses model {wildcards.model}")

    def run_metrics(self, wildcards: Any) -> list[str]:
        return [f"{self.results}/runs/{wildcards.experiment}/{r.run_id}/metrics.json"
                for r in self.plan[wildcards.experiment]]

    def run_id_list(self, wildcards: Any) -> str:
        """The run_ids as a Hydra list of strings: quoted, since a hex id like 79e9783984
        would otherwise parse as a float (inf)."""
        return ",".join(f'"{r.run_id}"' for r in self.plan[wildcards.experiment])
