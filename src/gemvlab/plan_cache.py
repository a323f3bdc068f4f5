"""A disk cache of planned experiments: planning composes one Hydra config per run (about half
a second each, 355 runs in the committed tree), and every `snakemake` call, every tables job and
every test plans again. A plan is a pure function of its arguments, the config tree, the
gemvlab source and the Hydra/OmegaConf versions, so it is keyed by all of them and reused.

Folder: ``$GEMVLAB_PLAN_CACHE`` (``off`` turns the cache off), default ``<repo>/.cache/plans``.
An entry that cannot be read, or whose configs no longer hash to their run_ids, is planned
again; entries unused for a week are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from gemvlab.files import atomic_write_text

_MAX_AGE_S = 7 * 24 * 3600
_SUFFIX = ".plan.json"


def cache_dir(repo_root: Path) -> Path | None:
    """Where plans are kept, or None when the cache is off."""
    chosen = os.environ.get("GEMVLAB_PLAN_CACHE", "")
    if chosen == "off":
        return None
    return Path(chosen) if chosen else repo_root / ".cache" / "plans"


def tree_digest(roots: Sequence[Path], patterns: Sequence[str]) -> str:
    """One sha256 over the relative paths and bytes of every file matching ``patterns``."""
    digest = hashlib.sha256()
    for root in roots:
        files = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file()})
        for path in files:
            digest.update(f"{root.name}/{path.relative_to(root)}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def plan_key(args: dict[str, Any], config_roots: Sequence[Path], source_root: Path) -> str:
    """The key of one plan: its arguments, the config files, the package's source, the
    interpreter and the composing libraries' versions."""
    parts = {
        "args": args,
        "config": tree_digest(config_roots, ("*.yaml",)),
        "source": tree_digest([source_root], ("*.py",)),
        "python": sys.version,
        "versions": [metadata.version(d) for d in ("hydra-core", "omegaconf")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load(folder: Path, key: str, valid: Callable[[list[dict]], bool]) -> list[dict] | None:
    """The cached runs of ``key`` when present, readable and ``valid``; else None."""
    path = folder / f"{key}{_SUFFIX}"
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(runs, list) or not valid(runs):
        return None
    os.utime(path)  # in use: keep it past the next prune
    return runs


def store(folder: Path, key: str, runs: list[dict]) -> None:
    """Keep ``runs`` under ``key`` when they survive JSON unchanged (a config holding a type
    JSON would alter, such as an int mapping key, is never cached); prune old entries."""
    text = json.dumps({"runs": runs}, sort_keys=True)
    if json.loads(text)["runs"] != runs:
        return
    try:
        atomic_write_text(folder / f"{key}{_SUFFIX}", text)
    except OSError:  # a read-only checkout plans every time, as it did before the cache
        return
    now = time.time()
    for old in folder.glob(f"*{_SUFFIX}"):
        try:
            if now - old.stat().st_mtime > _MAX_AGE_S:
                old.unlink()
        except OSError:
            continue
