"""`snakemake --config` mistakes stop at once with one line that names the valid choices."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemvlab.config import REPO_ROOT, experiment_ids
from gemvlab.errors import GemvlabError
from gemvlab.workflow import check_config


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
    from gemvlab.workflow import Workflow

    plan = SimpleNamespace(plan={"x": [SimpleNamespace(run_id="79e9783984"),
                                       SimpleNamespace(run_id="0123456789")]})
    listed = Workflow.run_id_list(plan, SimpleNamespace(experiment="x"))
    cfg = compose([f"report.run_ids=[{listed}]"])
    assert list(cfg.report.run_ids) == ["79e9783984", "0123456789"]
