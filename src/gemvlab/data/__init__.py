"""Datasets: fetched once into <resources>/data/<name>/ with fixed splits and a manifest."""

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from gemvlab.errors import GemvlabError


def data_dir(resources: Path, name: str) -> Path:
    """The one place a dataset's folder is named: everything else asks for it by name."""
    return Path(resources) / "data" / name


def refetch_hint(path: Path) -> str:
    """How to rebuild the dataset a file belongs to: by the fetch stage, which always rebuilds,
    since Snakemake never refetches while the dataset's manifest.json exists."""
    folder = next((p for p in Path(path).parents if p.parent.name == "data"), Path(path).parent)
    return (f"refetch it: python -m gemvlab.stages.fetch_data data={folder.name} "
            f"paths.resources={folder.parent.parent} (or delete {folder} and rerun snakemake)")


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
                                   f"file is damaged; {refetch_hint(path)}") from None
            if not isinstance(row, dict):
                raise GemvlabError(f"{path} line {number} is not a JSON object: the file is "
                                   f"damaged; {refetch_hint(path)}")
            yield row


def read_texts(path: Path) -> list[str]:
    """The texts of one split file (JSON lines with a "text" field)."""
    if not path.is_file():
        raise GemvlabError(f"{path} is missing: {refetch_hint(path)}")
    texts = []
    for number, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("text"), str):
            raise GemvlabError(f"{path} row {number} has no \"text\" string: the file is "
                               f"damaged; {refetch_hint(path)}")
        texts.append(row["text"])
    return texts
