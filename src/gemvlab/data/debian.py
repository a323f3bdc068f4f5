"""Read a Debian .deb without dpkg: an ar archive whose data.tar.* holds the files."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from gemvlab.errors import GemvlabError
from gemvlab.files import staging_dir


def apt_download(package: str, version: str, dest: Path) -> Path:
    """Fetch a .deb with apt-get download (no root needed, nothing installed), in a staging
    folder, so a killed download never leaves a partial .deb where a later fetch reuses it."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_{version.split(':')[-1]}_*.deb"))
    if found:
        return found[0]
    if shutil.which("apt-get") is None:
        raise GemvlabError(f"apt-get is not available to download Debian package {package}: "
                           f"download {package}_{version}_all.deb yourself and pass "
                           "data.local_file=<path to the .deb>")
    with staging_dir(dest, "apt") as stage:
        proc = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=stage,
                              capture_output=True, text=True)
        found = sorted(stage.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not found:
            reason = (proc.stderr.strip().splitlines() or ["no .deb was written"])[-1]
            raise GemvlabError(f"apt-get download {package}={version} failed ({reason}): run "
                               "apt-get update, or pass data.local_file=<path to the .deb>")
        target = dest / found[0].name
        os.replace(found[0], target)
    return target


def deb_members(deb: Path, wanted_suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Files of the package whose paths end with one of the suffixes."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise GemvlabError(f"{deb} is not a Debian package (.deb): pass a real "
                           "r-cran-janeaustenr .deb as data.local_file")
    pos, payload = 8, None
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            payload = body
            break
        pos += 60 + size + (size % 2)
    if payload is None:
        raise GemvlabError(f"{deb} has no data.tar member: the .deb is damaged; download it again")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(wanted_suffixes):
                extracted = tar.extractfile(member)
                if extracted is not None:
                    out[member.name] = extracted.read()
    return out
