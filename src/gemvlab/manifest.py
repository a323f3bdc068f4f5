"""Manifests for fetched models and datasets: where they came from, and a sha256 per file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
# A fetch stage's own run record shares the folder it builds; rebuilding keeps it.
_RECORD_FILES = {"config.yaml", "metrics.json", "provenance.json", MANIFEST}


def is_payload(path: Path) -> bool:
    """True for a fetched file, false for the manifest, the run record and logs."""
    return path.name not in _RECORD_FILES and not path.name.endswith(".log")


def clear_folder(folder: Path) -> None:
    """Empty a fetch folder for a rebuild; the manifest goes first, so a half-built folder
    never looks usable."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    for path in folder.iterdir():
        if is_payload(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def refetch_hint(folder: Path, command: str) -> str:
    """How to fetch a folder again: the fetch stage always rebuilds it, but Snakemake's fetch
    rules make the manifest, so they rerun only once it is gone."""
    return (f"refetch: {command}, or rm -f {folder / MANIFEST} and rerun snakemake (which "
            "refetches only a folder without its manifest)")


def write_manifest(folder: Path, meta: Mapping, files: list[Path]) -> dict:
    """Record every file's sha256 and size; written last, it marks the folder usable."""
    entries = {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
               for p in sorted(files)}
    manifest = {**meta, "files": entries}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, fetch_hint: str) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise GemvlabError(f"{folder} has no {MANIFEST}: {fetch_hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GemvlabError(f"{path} is not valid JSON ({exc.msg}): {fetch_hint}") from exc


def verify_manifest(folder: Path, fetch_hint: str) -> dict:
    """Check every listed file against its sha256 before anything reads it."""
    manifest = read_manifest(folder, fetch_hint)
    for rel, entry in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise GemvlabError(f"{path} is missing (listed in {folder / MANIFEST}): {fetch_hint}")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise GemvlabError(f"{path} is corrupt: sha256 {actual[:12]}… does not match the "
                               f"manifest's {entry['sha256'][:12]}…; {fetch_hint}")
    return manifest
