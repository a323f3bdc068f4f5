"""Where collected KV and trained KV codebooks live, and how they are stored (safetensors).

Both are resources, like models: made once per (model, settings), named by a hash of exactly
the settings that change them, and checked by sha256 when read. The Snakefile and the stages
compute the same folder from a run's resolved config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_path, atomic_write_text, sha256_bytes, sha256_file

if TYPE_CHECKING:
    import torch

    from gemvlab.kv.quant.commvq import KeyCodebook, ValueCodec

KV_FILE = "kv.safetensors"
CODEBOOK_FILE = "codebooks.safetensors"


def _digest(blob: Any) -> str:
    return sha256_bytes(json.dumps(blob, sort_keys=True, default=str).encode())[:10]


def artifact_dirs(plain: Mapping[str, Any]) -> dict[str, str] | None:
    """{"collect": folder of the collected KV, "train": folder of the codebooks} for a run
    whose method trains codebooks (method.codebooks), else None."""
    books = (plain.get("method") or {}).get("codebooks")
    if not books:
        return None
    resources, model = plain["paths"]["resources"], plain["model"]["name"]
    # Settings may be given per scale, so the scale is part of what names them.
    scale = plain["scale"]["name"]
    collect_id = _digest({"model": plain["model"], "collect": books["collect"], "scale": scale})
    train_id = _digest({"collect": collect_id,
                        "train": {k: v for k, v in books.items() if k != "collect"}})
    return {"collect": f"{resources}/kv/{model}/{collect_id}",
            "train": f"{resources}/codebooks/{model}/{train_id}"}


def needs_codebooks(plain: Mapping[str, Any]) -> bool:
    method = plain.get("method") or {}
    return artifact_dirs(plain) is not None and any(
        s.get("codec") == "commvq" for s in (method.get("settings") or {}).values())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write safetensors atomically, with the metadata and a sidecar sha256 written before the
    tensors land (a sidecar without its file reads as missing, never as verified)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"gemvlab": json.dumps(meta)})
        atomic_write_text(path.with_suffix(".sha256"), sha256_file(tmp) + "\n")


def load_tensors(path: Path, hint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    side = path.with_suffix(".sha256")
    if not path.is_file() or not side.is_file():
        raise GemvlabError(f"{path} is missing: {hint}")
    if sha256_file(path) != side.read_text().strip():
        raise GemvlabError(f"{path} does not match its sha256 (corrupt or edited): delete it "
                           f"and {hint}")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata().get("gemvlab", "{}"))
        return {k: fh.get_tensor(k) for k in fh.keys()}, meta  # noqa: SIM118


def save_codebooks(path: Path, books: list[KeyCodebook], values: dict[int, list[ValueCodec]],
                   meta: dict[str, Any]) -> None:
    import torch
    tensors = {f"key.{i}": torch.view_as_real(b.theta) for i, b in enumerate(books)}
    for bits, codecs in values.items():
        for i, codec in enumerate(codecs):
            for name, t in codec.state_dict().items():
                tensors[f"value{bits}.{i}.{name}"] = t
    hidden = {bits: codecs[0].enc.out_features for bits, codecs in values.items()}
    save_tensors(path, tensors, {**meta, "layers": len(books), "value_bits": sorted(values),
                                 "hidden": hidden, "features": values[min(values)][0].features})


def load_codebooks(path: Path, hint: str) -> tuple[list[KeyCodebook], dict[int, list[ValueCodec]],
                                                   dict[str, Any]]:
    import torch

    from gemvlab.kv.quant.commvq import KeyCodebook, ValueCodec

    tensors, meta = load_tensors(path, hint)
    books = [KeyCodebook(torch.view_as_complex(tensors[f"key.{i}"].contiguous()))
             for i in range(meta["layers"])]
    values: dict[int, list[ValueCodec]] = {}
    for bits in meta["value_bits"]:
        codecs = []
        for i in range(meta["layers"]):
            codec = ValueCodec(meta["features"], bits, int(meta["hidden"][str(bits)]))
            prefix = f"value{bits}.{i}."
            codec.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                   if k.startswith(prefix)})
            codecs.append(codec.eval())
        values[bits] = codecs
    return books, values, meta
