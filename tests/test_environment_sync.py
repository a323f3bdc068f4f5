"""pyproject.toml and environment.yml must list the same requirements."""

from __future__ import annotations

import re
import tomllib

import yaml

from gemvlab.config import REPO_ROOT


def _pyproject() -> tuple[set[str], set[str]]:
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project = data["project"]
    deps = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    return deps, set(data["tool"]["gemvlab"]["no-deps"])


def test_environment_yml_lists_the_pyproject_dependencies():
    text = (REPO_ROOT / "environment.yml").read_text()
    env = yaml.safe_load(text)
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    no_deps = set(re.findall(r"^#\s+(\S+==\S+)\s*$", text, flags=re.M))
    deps, pyproject_no_deps = _pyproject()
    assert set(pip) == deps
    assert no_deps == pyproject_no_deps


def test_torch_range_admits_the_cpu_build_on_disk():
    from packaging.requirements import Requirement

    deps, _ = _pyproject()
    torch_req = next(Requirement(d) for d in deps if d.startswith("torch"))
    assert torch_req.specifier.contains("2.13.0")
