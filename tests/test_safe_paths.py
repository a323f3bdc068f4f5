"""Names that become folders: a model or dataset name can never point a fetch's rebuild (which
empties its folder) at a folder outside resources/, and a fetch checks its source before it
empties anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemvlab.config import CONF_DIR, compose, sanitize, to_plain
from gemvlab.data import data_dir
from gemvlab.data.fetch import fetch_dataset
from gemvlab.errors import GemvlabError
from gemvlab.manifest import write_manifest
from gemvlab.models.fetch import fetch_model, model_dir
from gemvlab.paths import check_name
from tests.conftest import run_stage
from tests.tiny import save_model_folder

BAD_NAMES = ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "-flag", "x\n", "a b"]


def victim(tmp_path: Path) -> Path:
    """A folder outside resources/ with a file that must survive every attack."""
    folder = tmp_path / "victim"
    folder.mkdir(exist_ok=True)
    (folder / "sentinel.txt").write_text("keep me")
    return folder


def survived(folder: Path) -> bool:
    return (folder / "sentinel.txt").read_text() == "keep me"


def attacks(tmp_path: Path) -> list[str]:
    """The victim named absolutely and through .. from resources/<kind>/."""
    return [str(victim(tmp_path)), "../../victim"]


def model_cfg(*overrides: str) -> dict:
    return to_plain(compose(list(overrides)))["model"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_are_not_one_plain_component_are_refused(name):
    with pytest.raises(GemvlabError, match="is not a plain name") as err:
        check_name(name, "model.name")
    assert "\n" not in str(err.value)


def test_shipped_and_hub_model_names_stay_valid(tmp_path):
    """Hub names come through the sanitize resolver; every shipped model config must pass."""
    hub = model_cfg("model=hub", "model.hub_id=meta-llama/Llama-3.2-1B")
    assert hub["name"] == sanitize("meta-llama/Llama-3.2-1B") == "meta-llama--Llama-3.2-1B"
    names = [model_cfg(f"model={p.stem}")["name"]
             for p in sorted((CONF_DIR / "model").glob("*.yaml")) if p.stem != "local"]
    assert len(names) > 10
    for name in [*names, hub["name"]]:
        assert model_dir(tmp_path, name) == tmp_path / "models" / name


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("model", ["random-tiny-llama", "local"])
def test_a_model_name_cannot_empty_a_folder_outside_resources(tmp_path, which, model):
    """The attack of issue 20, with an otherwise valid source: only the name check stops it."""
    source = [f"model.path={save_model_folder(tmp_path / 'src')}"] if model == "local" else []
    cfg = model_cfg(f"model={model}", f"model.name={attacks(tmp_path)[which]}", *source)
    with pytest.raises(GemvlabError, match="model.name .* is not a plain name"):
        fetch_model(cfg, tmp_path / "res", online=False)
    assert survived(tmp_path / "victim")


@pytest.mark.parametrize("which", [0, 1])
def test_a_dataset_name_cannot_reach_outside_resources(tmp_path, which):
    name = attacks(tmp_path)[which]
    with pytest.raises(GemvlabError, match="dataset name .* is not a plain name"):
        data_dir(tmp_path / "res", name)
    cfg = {**to_plain(compose(["data=austen"]))["data"], "name": name}
    with pytest.raises(GemvlabError):
        fetch_dataset(cfg, tmp_path / "res")
    assert survived(tmp_path / "victim")


def test_a_model_folder_linked_out_of_resources_is_not_emptied(tmp_path):
    models = tmp_path / "res" / "models"
    models.mkdir(parents=True)
    (models / "tiny").symlink_to(victim(tmp_path), target_is_directory=True)
    with pytest.raises(GemvlabError, match="links outside"):
        fetch_model(model_cfg("model=random-tiny-llama", "model.name=tiny"), tmp_path / "res",
                    online=False)
    assert survived(tmp_path / "victim")


def fetched(resources: Path, name: str) -> Path:
    """A model folder as an earlier successful fetch left it."""
    folder = resources / "models" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    write_manifest(folder, {"name": name}, [folder / "model.safetensors"])
    return folder


@pytest.mark.parametrize(("overrides", "error"), [
    (["model=local", "model.path=/nonexistent"], "needs config.json"),
    (["model=random-tiny-llama", "model.source=ftp"], "model.source 'ftp' is unknown"),
    (["model=hub-opt-125m"], "hub_online=false"),
])
def test_a_bad_source_leaves_the_earlier_model_folder_untouched(tmp_path, overrides, error):
    folder = fetched(tmp_path, "kept")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(GemvlabError, match=error):
        fetch_model(model_cfg(*overrides, "model.name=kept"), tmp_path, online=False)
    assert sorted(p.name for p in folder.iterdir()) == before == ["manifest.json",
                                                                "model.safetensors"]


def test_a_local_source_inside_its_own_destination_is_refused(tmp_path):
    folder = save_model_folder(tmp_path / "models" / "tiny")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    cfg = model_cfg("model=local", "model.name=tiny", f"model.path={folder}")
    with pytest.raises(GemvlabError, match="which the fetch empties first"):
        fetch_model(cfg, tmp_path, online=False)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == weights != []


@pytest.mark.parametrize(("stage", "overrides"), [
    ("fetch_model", ["model=local", "model.path={tmp}/nonexistent", "model.name={tmp}/victim"]),
    ("fetch_data", ["data.name=../../victim"]),
    ("tables", ["experiment=baseline", "report.run_ids=[../../victim]"]),
])
def test_the_cli_refuses_the_attack_in_one_line(tmp_path, stage, overrides):
    folder = victim(tmp_path)
    proc = run_stage(stage, *(o.format(tmp=tmp_path) for o in overrides),
                     f"paths.resources={tmp_path / 'res'}", f"paths.results={tmp_path / 'results'}")
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0
    assert len(errors) == 1 and "is not a plain name" in errors[0], proc.stderr
    assert survived(folder) and sorted(p.name for p in folder.iterdir()) == ["sentinel.txt"]
