"""Checks on a checkpoint that a manifest cannot make: its files parse, and it fills every weight.

A manifest written after a file was truncated still matches it, and transformers loads a
checkpoint whose tensor names do not fit the architecture with random weights, logging only a
warning: both would otherwise end in a traceback or in a complete-looking, wrong run record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gemvlab.errors import GemvlabError

SHOWN = 3  # keys named in an error; the count says how many more


def check_readable(paths: Iterable[Path], hint: str) -> None:
    """Parse every JSON file and every safetensors header, so that a damaged file is named in
    one line instead of surfacing as a traceback from transformers or safetensors."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(paths):
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise GemvlabError(f"{path} is not valid JSON (truncated or damaged: "
                                   f"{_first_line(exc)}); {hint}") from exc
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except SafetensorError as exc:
                raise GemvlabError(f"{path} is not a readable safetensors file (truncated or "
                                   f"damaged: {_first_line(exc)}); {hint}") from exc


def weight_mismatch(info: Mapping[str, Any]) -> str | None:
    """What from_pretrained(output_loading_info=True) did not fill from the checkpoint, or None
    when it filled every weight. Tied weights and non-persistent buffers are never listed
    there, so a tied lm_head or a rotary inv_freq is no mismatch."""
    shapes = {key: f"{key} {list(ckpt)} in the checkpoint, {list(model)} in the model"
              for key, ckpt, model in info["mismatched_keys"]}
    groups = (("missing", sorted(info["missing_keys"])),
              ("unexpected", sorted(info["unexpected_keys"])),
              ("of the wrong shape", [shapes[key] for key in sorted(shapes)]))
    parts = [f"{len(keys)} {label} ({_some(keys)})" for label, keys in groups if keys]
    return "; ".join(parts) or None


def _some(keys: list[str]) -> str:
    more = len(keys) - SHOWN
    return ", ".join(keys[:SHOWN]) + (f", and {more} more" if more > 0 else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
