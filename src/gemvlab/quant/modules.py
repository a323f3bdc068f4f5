"""Finding and swapping a model's layers by name, shared by the quantizers and the analyses."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """A module named in skip, by full name or last parts (``lm_head``, ``mlp.down_proj``)."""
    return any(name == s or name.endswith(f".{s}") for s in skip)


def block_key(name: str) -> str | None:
    """The transformer block a module belongs to: its path up to the first numeric part
    (``model.layers.3``), the same in Llama, Gemma and OPT; None outside the blocks."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return None if index is None else ".".join(parts[: index + 1])


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
