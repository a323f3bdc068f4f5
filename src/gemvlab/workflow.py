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
from typing import Any

from gemvlab.config import PlannedRun, experiment_ids, plan_experiment
from gemvlab.kv.quant.codebooks import CODEBOOK_FILE, KV_FILE, artifact_dirs, needs_codebooks

_ARTIFACT_FOLDERS = {"collect": "kv", "train": "codebooks"}
# A run job's resources where its experiment does not set them (job_mem_mb, job_runtime_min).
DEFAULT_MEM_MB = 8000
DEFAULT_RUNTIME_MIN = 60


def needs_gpu(run: PlannedRun) -> bool:
    """A benchmark asks for CUDA in its bench config; a model stage by its scale's device."""
    if run.stage == "bench":
        return run.config.get("bench", {}).get("device") == "cuda"
    if run.stage == "simulate":
        return False
    return run.config["scale"]["device"] == "cuda"


def _quote(items: list[str] | tuple[str, ...]) -> str:
    return " ".join(shlex.quote(i) for i in items)


@dataclass
class Workflow:
    scale: str
    results: str
    resources: str
    common: list[str]
    experiments: list[str]
    # The --config this workflow was given, so that the report's own snakemake sees the same DAG.
    config_args: list[str] = field(default_factory=list)
    plan: dict[str, list[PlannedRun]] = field(default_factory=dict)
    # The environment's interpreter, the same path whether snakemake ran as a script or -m.
    python: str = os.path.join(sys.prefix, "bin", "python")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Workflow:
        """Snakemake --config keys: scale, experiments, overrides, results, resources."""
        scale = str(config.get("scale", "cpu"))
        results = str(config.get("results") or ("results" if scale == "cpu"
                                                 else f"results/{scale}"))
        resources = str(config.get("resources", "resources"))
        extra = shlex.split(str(config.get("overrides", "")))
        common = [f"scale={scale}", f"paths.results={results}", f"paths.resources={resources}",
                  *extra]
        experiments = [e for e in str(config.get("experiments", "")).split(",") if e]
        wf = cls(scale, results, resources, common, experiments or experiment_ids(),
                 config_args=[f"{k}={v}" for k, v in config.items()])
        wf.plan = {exp: [run for run in plan_experiment(exp, common) if wf.can_run(run)]
                   for exp in wf.experiments}
        return wf

    def can_run(self, run: PlannedRun) -> bool:
        """Plan a run only where it can run, or when its record exists already.

        A run that needs a CUDA GPU waits for a machine with one, and a hub model for
        hub_online=true; so a CPU machine keeps committed GPU results in its tables without
        trying to redo them, and an offline one leaves the hub's models out.
        """
        if os.path.isfile(f"{self.results}/runs/{run.experiment}/{run.run_id}/metrics.json"):
            return True
        if run.stage != "bench" and run.config["model"].get("source") == "hub" \
                and not run.config.get("hub_online"):
            return False
        if run.config.get("bench", {}).get("device") != "cuda":
            return True
        import torch

        return torch.cuda.is_available()

    @property
    def targets(self) -> list[str]:
        """Everything the default job makes, listed in full: Snakemake (since 7.7) does not
        rerun for a missing intermediate file once the final one exists, so a new experiment or
        a deleted run record would otherwise go unnoticed behind an existing CLAIMS.md."""
        runs = [f"{self.results}/runs/{exp}/{r.run_id}/metrics.json"
                for exp, plan in self.plan.items() for r in plan]
        tables = [f"{self.results}/tables/{exp}" for exp in self.experiments]
        return [*runs, *tables, f"{self.results}/CLAIMS.md", f"{self.results}/report.html"]

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

    def run_ids_of(self, stage: str) -> str:
        """A regex matching exactly the run_ids of one stage (never-matching if none)."""
        ids = sorted({rid for (_, rid), run in self.runs.items() if run.stage == stage})
        return "|".join(ids) if ids else "(?!x)x"

    def run_inputs(self, wildcards: Any) -> list[str]:
        return self.run_inputs_of(self.runs[(wildcards.experiment, wildcards.run_id)])

    def run_inputs_of(self, run: PlannedRun, codebooks: bool = True) -> list[str]:
        """A model and its eval datasets, and the KV codebooks its method trains; a benchmark
        (random tensors) needs nothing, a simulation only the GPU measurements it calibrates on."""
        if run.stage == "bench":
            return []
        if run.stage == "simulate":
            return [run.config["hw"]["gpu"]["measurements"]]
        datasets = run.config.get("eval", {}).get("datasets", [])
        needs = [f"{self.resources}/models/{run.config['model']['name']}/manifest.json",
                 *(f"{self.resources}/data/{d}/manifest.json" for d in datasets)]
        if codebooks and needs_codebooks(run.config):
            needs.append(f"{artifact_dirs(run.config)['train']}/{CODEBOOK_FILE}")
        return needs

    def _artifact_run(self, kind: str, wildcards: Any) -> PlannedRun:
        """A planned run whose KV artifact of this kind (collect, train) the job makes."""
        folder = "/".join([self.resources, _ARTIFACT_FOLDERS[kind], wildcards.model,
                           wildcards.artifact])
        for run in self.runs.values():
            dirs = artifact_dirs(run.config)
            if dirs is not None and dirs[kind] == folder:
                return run
        raise KeyError(f"no planned run uses the KV artifact {folder}")

    def collect_args(self, wildcards: Any) -> str:
        return _quote(self._artifact_run("collect", wildcards).overrides)

    def collect_inputs(self, wildcards: Any) -> list[str]:
        return self.run_inputs_of(self._artifact_run("collect", wildcards), codebooks=False)

    def train_args(self, wildcards: Any) -> str:
        return _quote(self._artifact_run("train", wildcards).overrides)

    def train_inputs(self, wildcards: Any) -> list[str]:
        run = self._artifact_run("train", wildcards)
        return [f"{artifact_dirs(run.config)['collect']}/{KV_FILE}"]

    def collect_gpus(self, wildcards: Any) -> int:
        """Collection runs the model where the run that needs it does (training: on the CPU)."""
        return int(needs_gpu(self._artifact_run("collect", wildcards)))

    def run_args(self, wildcards: Any) -> str:
        return _quote(self.runs[(wildcards.experiment, wildcards.run_id)].overrides)

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
        return f"{self.results}/runs/{wildcards.experiment}/{wildcards.run_id}"

    def model_args(self, wildcards: Any) -> str:
        """The model overrides of a run that uses this model (packaged, hub, local, random)."""
        for run in self.runs.values():
            if run.config["model"]["name"] == wildcards.model:
                return _quote([o for o in run.overrides if o.startswith(("model=", "model."))])
        raise KeyError(f"no planned run uses model {wildcards.model}")

    def run_metrics(self, wildcards: Any) -> list[str]:
        return [f"{self.results}/runs/{wildcards.experiment}/{r.run_id}/metrics.json"
                for r in self.plan[wildcards.experiment]]

    def run_id_list(self, wildcards: Any) -> str:
        return ",".join(r.run_id for r in self.plan[wildcards.experiment])
