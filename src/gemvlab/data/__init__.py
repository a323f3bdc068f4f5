"""Datasets: fetched once into <resources>/data/<name>/ with fixed splits and a manifest."""

from pathlib import Path


def data_dir(resources: Path, name: str) -> Path:
    """The one place a dataset's folder is named: everything else asks for it by name."""
    return Path(resources) / "data" / name
