"""Stages, the Workflow and the rules know no paper: experiments are plug-ins."""

from __future__ import annotations

import re

import yaml

from gemvlab.config import CONF_DIR, REPO_ROOT, experiment_ids

SHARED = [*sorted((REPO_ROOT / "src" / "gemvlab" / "stages").glob("*.py")),
          REPO_ROOT / "src" / "gemvlab" / "workflow.py", REPO_ROOT / "Snakefile",
          *sorted((REPO_ROOT / "rules").glob("*.smk"))]
# Groups that belong to methods and papers; model/, data/, eval/, scale/ are shared vocabulary.
PAPER_GROUPS = ("method", "bench", "analysis", "hw", "sim")


def paper_words() -> set[str]:
    """Experiment ids, the options of paper groups (a method, a benchmark, a bench kind), the
    groups only papers bring, and the paper keys shared code once branched on."""
    words = {*experiment_ids(), "hw", "sim", "analysis", "measurements", "codebooks"}
    for folder in [CONF_DIR, *(REPO_ROOT / "experiments").glob("*/conf")]:
        for group in PAPER_GROUPS:
            for option in (folder / group).glob("*.yaml"):
                words.add(option.stem)
                words.add(str((yaml.safe_load(option.read_text()) or {}).get("kind", "none")))
    return words - {"none"}


def mentions(code: str, word: str) -> bool:
    """``word`` as a name or a part of one (snake_case parts count: glvq_metrics names glvq)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", code) is not None


def test_no_shared_file_names_a_paper_or_its_keys():
    words = paper_words()
    assert {"glvq", "neupims", "hw", "codebooks", "lattice"} <= words
    found = {}
    for path in SHARED:
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        hits = {w for w in words if mentions(code, w)}
        if hits:
            found[str(path.relative_to(REPO_ROOT))] = sorted(hits)
    assert not found, found


def test_the_check_sees_a_paper_name():
    """The scan above is not vacuous: a stage that names a paper is caught."""
    words = paper_words()
    code = 'if cfg.bench.kind == "lattice": return glvq_metrics(cfg)'
    assert {w for w in words if mentions(code, w)} >= {"glvq", "lattice"}
