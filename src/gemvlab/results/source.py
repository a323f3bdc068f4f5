"""Which code and which environment made a record: the gemvlab source files the run imported,
hashed, and the hash of requirements.lock. A run_id names a config, not code, so without these a
record made by older code would stay in the tables unnoticed after the code changed. The files
are those of the whole run process, and finding a run's runner imports every ``runs`` module, so
a change to any runner marks every record: conservative, never silent."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import gemvlab
from gemvlab.config import REPO_ROOT
from gemvlab.files import sha256_bytes, sha256_file

SRC_ROOT = Path(gemvlab.__file__).resolve().parent.parent
LOCK = REPO_ROOT / "requirements.lock"


def imported_sources(root: Path = SRC_ROOT) -> list[str]:
    """The files under ``root`` of every module this process has imported, relative, sorted."""
    package = (root / "gemvlab").resolve()
    found = set()
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        if name and Path(name).resolve().is_relative_to(package):
            found.add(Path(name).resolve().relative_to(root.resolve()).as_posix())
    return sorted(found)


def sources_hash(files: Iterable[str], root: Path = SRC_ROOT,
                 digests: dict[str, str] | None = None) -> str | None:
    """One sha256 over the files' names and contents (None when one is gone); ``digests``
    caches file hashes across records."""
    digests = {} if digests is None else digests
    parts = []
    for rel in sorted(files):
        if rel not in digests:
            path = root / rel
            digests[rel] = sha256_file(path) if path.is_file() else ""
        if not digests[rel]:
            return None
        parts.append(f"{rel}\0{digests[rel]}")
    return sha256_bytes("\n".join(parts).encode())


def source_record(root: Path = SRC_ROOT) -> dict:
    """What a record keeps about its code: the files the run imported and their hash."""
    files = imported_sources(root)
    return {"sha256": sources_hash(files, root), "files": files}


def lock_hash(lock: Path = LOCK) -> str | None:
    return sha256_file(lock) if lock.is_file() else None


def code_changed(provenance: Mapping, root: Path = SRC_ROOT,
                 digests: dict[str, str] | None = None) -> bool | None:
    """Whether the code a record names has changed since it was made; None for a record made
    before records named their code."""
    source = provenance.get("source")
    if not source or not source.get("files"):
        return None
    return sources_hash(source["files"], root, digests) != source.get("sha256")
