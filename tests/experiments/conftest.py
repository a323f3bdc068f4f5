"""Where the experiments' end-to-end tests get their models and data, and put their results.

Every test runs once on tiny stand-ins of the packaged models (the default suite) and once on
the real packaged models (`pytest -m slow`, fetched into the repository's resources/). Each
kind has one results folder per session, so the report test reuses the experiments' runs: under
pytest-xdist they all run on one worker, in order (tests/conftest.py), the rest on the others.
"""

from __future__ import annotations

import pytest

from gemvlab.config import REPO_ROOT
from tests.experiments.smoke import Setup
from tests.tiny_resources import build_resources


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("tiny")
    return Setup(build_resources(root / "resources"), root / "results", real=False)


@pytest.fixture(scope="session")
def real_setup(tmp_path_factory) -> Setup:
    return Setup(REPO_ROOT / "resources", tmp_path_factory.mktemp("real") / "results",
                 real=True)


@pytest.fixture(params=["tiny", pytest.param("real", marks=pytest.mark.slow)])
def setup(request) -> Setup:
    return request.getfixturevalue(f"{request.param}_setup")

