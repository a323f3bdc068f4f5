"""`snakemake --config` mistakes stop at once with one line that names the valid choices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemvlab import override_types
from gemvlab.config import REPO_ROOT, compose_checked, experiment_ids
from gemvlab.errors import GemvlabError
from gemvlab.workflow import Workflow, check_config


@pytest.mark.parametrize(("config", "says"), [
    ({"experimentz": "glvq"}, "experimentz: unknown key; use scale, experiments, overrides"),
    ({"experiments": "glvq,nope"}, "experiments=nope: unknown experiment; use one or more of"),
    ({"scale": "huge"}, "scale=huge: unknown scale; use one of cpu, gpu, paper, smoke"),
    ({"scale": 3}, "scale: 3 is not of type 'string'"),
])
def test_config_mistakes_name_the_valid_choices(config: dict, says: str):
    with pytest.raises(GemvlabError) as err:
        check_config(config)
    assert says in str(err.value) and "\n" not in str(err.value)
    if "unknown experiment" in says:
        assert all(exp in str(err.value) for exp in experiment_ids())


def test_valid_config_passes():
    check_config({"scale": "smoke", "experiments": "glvq,neupims", "overrides": "seed=1",
                  "results": "/tmp/r", "resources": "/tmp/s"})


def test_snakemake_stops_before_planning():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--config", "scale=huge"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "--config scale=huge: unknown scale; use one of cpu, gpu, paper, smoke" in said


def test_run_ids_reach_the_tables_stage_as_strings():
    """A hex run_id such as 79e9783984 must not parse as a float (it did: inf)."""
    from types import SimpleNamespace

    from gemvlab.config import compose

    plan = SimpleNamespace(plan={"x": [SimpleNamespace(run_id="79e9783984"),
                                       SimpleNamespace(run_id="0123456789")]})
    listed = Workflow.run_id_list(plan, SimpleNamespace(experiment="x"))
    cfg = compose([f"report.run_ids=[{listed}]"])
    assert list(cfg.report.run_ids) == ["79e9783984", "0123456789"]


@pytest.mark.parametrize(("default", "value", "fits"), [
    (20, 5, True), (20, None, True), (20, "abc", False), (20, 2.5, False), (20, True, False),
    (0.5, 1, True), (0.5, 1e-3, True), (0.5, "abc", False), (0.5, False, False),
    (True, False, True), (True, 1, False), (True, "yes", False),
    (None, "abc", True), ("austen", 3, True), ([1, 2], ["a"], True),
])
def test_a_value_fits_the_type_of_its_default(default, value, fits):
    assert override_types.fits(default, value) is fits


@pytest.mark.parametrize(("override", "says"), [
    ("seed=abc", "seed=abc: expected an integer, like its default 1234"),
    ("eval.lm_eval.limit=abc", "eval.lm_eval.limit=abc: expected an integer, like its default"),
    ("hub_online=1", "hub_online=1: expected true or false, like its default false"),
    ("eval.perplexity.stride=0.5", "eval.perplexity.stride=0.5: expected an integer"),
])
def test_a_value_of_the_wrong_type_stops_the_plan(override: str, says: str):
    """Before any job: these passed planning and failed mid-run (the limit after perplexity)."""
    with pytest.raises(GemvlabError) as err:
        Workflow.from_config({"experiments": "baseline", "scale": "smoke", "overrides": override})
    assert says in str(err.value) and "\n" not in str(err.value)


def test_values_of_a_fitting_type_pass():
    cfg = compose_checked(["experiment=oftv2", "method=lora", "method.lr=1", "threads=null",
                           "eval=standard", "eval.lm_eval.limit=null", "eval.datasets=[austen]",
                           "hub_online=true", "seed=7", "model=local", "model.path=/x"])
    assert (cfg.method.lr, cfg.eval.lm_eval.limit, cfg.seed) == (1, None, 7)


def test_an_override_picking_the_experiment_names_the_snakemake_key():
    with pytest.raises(GemvlabError) as err:
        check_config({"overrides": "seed=1 experiment=nope"})
    assert "experiment=nope" in str(err.value)
    assert "--config experiments=<id>" in str(err.value) and "\n" not in str(err.value)
