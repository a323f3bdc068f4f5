"""Every experiment is one folder, experiments/<id>/, and no experiment lives under conf/."""

from __future__ import annotations

import pytest
import yaml

from gemvlab.config import CONF_DIR, EXPERIMENTS_DIR, compose, experiment_ids, register_experiments
from gemvlab.errors import GemvlabError


@pytest.mark.parametrize("exp", experiment_ids())
def test_experiment_folder_is_complete_and_composes(exp):
    folder = EXPERIMENTS_DIR / exp
    assert all((folder / name).is_file() for name in ("experiment.yaml", "claims.yaml",
                                                      "README.md"))
    assert compose([f"experiment={exp}"]).experiment.id == exp


def test_no_experiment_grid_under_conf():
    assert not (CONF_DIR / "experiment").exists()
    for path in CONF_DIR.rglob("*.yaml"):
        assert "experiment" not in (yaml.safe_load(path.read_text()) or {}), path


def test_an_unknown_experiment_lists_the_folders():
    with pytest.raises(GemvlabError, match="unknown experiment 'nope': choose one of baseline,"):
        compose(["experiment=nope"])


def test_an_option_defined_twice_stops(tmp_path, monkeypatch):
    (tmp_path / "a" / "conf" / "method").mkdir(parents=True)
    (tmp_path / "a" / "conf" / "method" / "fp32.yaml").write_text("name: fp32\n")
    monkeypatch.setattr("gemvlab.config.EXPERIMENTS_DIR", tmp_path)
    register_experiments.cache_clear()
    try:
        with pytest.raises(GemvlabError, match="config method/fp32 is defined twice"):
            register_experiments()
    finally:
        register_experiments.cache_clear()


def test_the_folders_are_a_hydra_config_source():
    """What Hydra's --help, its option lists and its loader ask of the experiment folders."""
    from hydra.core.object_type import ObjectType

    from gemvlab.experiment_source import ExperimentFolders

    register_experiments()
    source = ExperimentFolders("gemvlab experiments", "gemvlab-experiments://experiments")
    assert {"experiment", "method", "hw"} <= set(source.list("", ObjectType.GROUP))
    assert source.list("experiment", ObjectType.CONFIG) == sorted(experiment_ids())
    assert source.is_group("method") and not source.is_group("nope")
    assert source.is_config("experiment/glvq.yaml") and not source.is_config("experiment/x")
    loaded = source.load_config("experiment/glvq.yaml")
    assert loaded.header["package"] == "_global_" and loaded.config.experiment.id == "glvq"
