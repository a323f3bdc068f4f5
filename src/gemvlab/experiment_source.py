"""Hydra reads experiments/<id>/ as config groups, so adding a paper edits no shared file.

``experiments/<id>/experiment.yaml`` is option ``<id>`` of group ``experiment``, and
``experiments/<id>/conf/<group>/<name>.yaml`` option ``<name>`` of ``<group>``, each with the
package its header names, as if it lay in conf/. A config source of its own (scheme
``gemvlab-experiments``, put on every search path by a search-path plugin) reads the files when
Hydra asks; Hydra's ConfigStore would do the same but is deep-copied on every compose, which
made planning 1.6 times as slow.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from gemvlab.errors import GemvlabError

SCHEME = "gemvlab-experiments"


def experiment_options(experiments: Path, conf: Path) -> dict[str, Path]:
    """Every option the experiment folders offer, ``group/name`` -> file; an option that two
    folders, or a folder and conf/, both define stops with the two paths."""
    files = [(f"experiment/{p.parent.name}", p)
             for p in sorted(experiments.glob("*/experiment.yaml"))]
    files += [(f"{p.parent.name}/{p.stem}", p)
              for p in sorted(experiments.glob("*/conf/*/*.yaml"))]
    options: dict[str, Path] = {}
    for option, path in files:
        other = options.get(option, conf / f"{option}.yaml")
        if other.is_file():
            raise GemvlabError(f"config {option} is defined twice, in {path} and {other}: "
                               "rename one")
        options[option] = path
    return options


class ExperimentFolders(ConfigSource):
    """The options of ``experiment_options`` as a Hydra config source (read-only, lazy)."""

    # Set by gemvlab.config.register_experiments before any compose.
    options: dict[str, Path] = {}

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def load_config(self, config_path: str) -> ConfigResult:
        path = self.options.get(self._normalize_file_name(config_path)[: -len(".yaml")])
        if path is None:
            raise ConfigLoadError(f"Config not found : {config_path}")
        text = path.read_text(encoding="utf-8")
        return ConfigResult(config=OmegaConf.create(text), path=f"{SCHEME}://{path.parent}",
                            provider=self.provider, header=self._get_header_dict(text))

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        prefix = config_path.strip("/")
        return prefix == "" or any(o.startswith(prefix + "/") for o in self.options)

    def is_config(self, config_path: str) -> bool:
        return self._normalize_file_name(config_path)[: -len(".yaml")] in self.options

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        prefix = config_path.strip("/")
        found: set[str] = set()
        for option in self.options:
            group, _, name = option.rpartition("/")
            if group == prefix and results_filter in (None, ObjectType.CONFIG):
                found.add(name)
            elif prefix == "" and results_filter in (None, ObjectType.GROUP):
                found.add(group)
        return sorted(found)


class ExperimentsOnSearchPath(SearchPathPlugin):
    """Puts the experiment folders after conf/ on every search path in this process."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="gemvlab experiments", path=f"{SCHEME}://experiments")


def register(experiments: Path, conf: Path) -> None:
    """Offer the experiment folders to every later compose and @hydra.main in this process."""
    from hydra.core.plugins import Plugins

    ExperimentFolders.options = experiment_options(experiments, conf)
    Plugins.instance().register(ExperimentFolders)
    Plugins.instance().register(ExperimentsOnSearchPath)
