"""Writing and checking files: atomic writes and download staging (a reader never sees half
a file, a killed job never leaves one that looks complete, and the next job clears what it
left) and sha256 digests (manifests, sidecars, config hashes).

Its own module, below results/, manifest and models/, because all of them write and hash
files and none should import another just for that.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CHUNK = 1 << 22


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes in memory (config hashes)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks so weights never sit in memory at once."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp file next to ``path`` for the block to write (by any writer, e.g. safetensors);
    flushed to disk and renamed onto ``path`` when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the cluster's other users
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_leftover_temps(path: Path) -> None:
    """Delete the temp files of ``atomic_path(path)`` that a killed process (no cleanup runs
    on SIGKILL) left beside ``path``; call it before rebuilding ``path``."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)


@contextmanager
def staging_dir(dest: Path, tool: str) -> Iterator[Path]:
    """A fresh, empty ``dest/.<tool>.partial/`` for a tool that downloads into a folder (apt-get,
    pip) and may leave half a file when killed: move only what it completed into ``dest``
    (os.replace, same file system). Removed afterwards; one a killed fetch left is emptied."""
    stage = dest / f".{tool}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: object) -> None:
    """Indented, sorted keys, a final newline: equal data gives equal bytes."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A fresh folder beside ``folder`` for the block to fill; when the block succeeds, its
    files replace ``folder``'s (each by a rename; files it did not make are removed), and when
    it fails, ``folder`` is left exactly as it was. For outputs made of several files
    (a table folder) that a failed or killed rebuild must never leave half-written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield staging
        folder.mkdir(exist_ok=True)
        made = {p.name for p in staging.iterdir()}
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
        for path in folder.iterdir():
            if path.name not in made and path.is_file():
                path.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
