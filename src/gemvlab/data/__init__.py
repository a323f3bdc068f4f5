"""Datasets: fetched once into <resources>/data/<name>/ with fixed splits and a manifest."""

import gzip
import json
from collections.abc import Iterator
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


def _file_hint(path: Path) -> str:
    """How to rebuild the dataset a file of resources/data/<name>/ belongs to."""
    folder = next((p for p in Path(path).parents if p.parent.name == "data"), Path(path).parent)
    return data_fetch_hint(folder.parent.parent, folder.name)


def read_jsonl(path: Path) -> Iterator[dict]:
    """The rows of a JSON-lines file (gzipped if it ends in .gz), one object a line; a damaged
    line is one error naming its file and line, not a traceback from deep in a run."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GemvlabError(f"{path} line {number} is not valid JSON ({exc.msg}): the "
                                   f"file is damaged; {_file_hint(path)}") from None
            if not isinstance(row, dict):
                raise GemvlabError(f"{path} line {number} is not a JSON object: the file is "
                                   f"damaged; {_file_hint(path)}")
            yield row


def read_texts(path: Path) -> list[str]:
    """The texts of one split file (JSON lines with a "text" field)."""
    if not path.is_file():
        raise GemvlabError(f"{path} is missing: {_file_hint(path)}")
    texts = []
    for number, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("text"), str):
            raise GemvlabError(f"{path} row {number} has no \"text\" string: the file is "
                               f"damaged; {_file_hint(path)}")
        texts.append(row["text"])
    return texts
