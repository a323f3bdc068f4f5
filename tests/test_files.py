"""Atomic writes and sha256 digests (gemvlab.files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gemvlab.files import atomic_path, atomic_write_json, sha256_bytes, sha256_file


def test_sha256_file_is_the_plain_digest_of_its_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000  # several read chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_bytes(data) == hashlib.sha256(data).hexdigest()


def test_atomic_write_json_is_sorted_indented_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert list(path.parent.iterdir()) == [path]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]
