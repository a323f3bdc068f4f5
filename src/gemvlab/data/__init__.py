"""Datasets: fetched once into <resources>/data/<name>/ with fixed splits and a manifest."""

import json
from pathlib import Path

from gemvlab.errors import GemvlabError
from gemvlab.manifest import refetch_hint
from gemvlab.paths import safe_child


def data_dir(resources: Path, name: str) -> Path:
    """The one place a dataset's folder is named (and its name checked): everything else asks
    for it by name."""
    return safe_child(Path(resources) / "data", name, "dataset name")


def data_fetch_hint(resources: Path, name: str) -> str:
    """The command that really refetches this dataset (the fetch stage, or Snakemake once the
    manifest is gone)."""
    return refetch_hint(data_dir(resources, name), "python -m gemvlab.stages.fetch_data "
                        f"data={name} paths.resources={resources}")


def read_texts(path: Path) -> list[str]:
    """The texts of one split file (JSON lines with a "text" field)."""
    if not path.is_file():
        raise GemvlabError(f"{path} is missing; "
                           f"{data_fetch_hint(path.parents[2], path.parent.name)}")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]
