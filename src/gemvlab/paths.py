"""Names from config that become folders (model.name, data.name, experiment.id): checked
before anything is written or deleted there, because ``root / "/abs"`` is ``/abs`` and a
fetch empties its folder first, so ``model.name=/home/me`` would empty a home folder."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gemvlab.errors import GemvlabError

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: object, what: str) -> str:
    """``name`` if it is one plain path component (so never '/', '..' or empty), else an error."""
    text = str(name)
    if not _PLAIN.fullmatch(text):
        raise GemvlabError(f"{what} {text!r} is not a plain name: use letters, digits, '.', '_' "
                           "and '-', starting with a letter or digit (no '/' or '..')")
    return text


def safe_child(root: Path, name: object, what: str) -> Path:
    """``root / name``, refused unless name is plain and the folder, links followed, lies
    inside root (a link out of root would send a rebuild's deletes elsewhere)."""
    child = Path(root) / check_name(name, what)
    if not child.resolve().is_relative_to(Path(root).resolve()):
        raise GemvlabError(f"{what} {name!r}: {child} links outside {root}; remove the link "
                           "or pick another name")
    return child


def check_config_names(plain: Mapping[str, Any]) -> None:
    """Check a resolved config's folder names before a stage writes anything (its run record
    included), so a bad name stops the run with nothing touched."""
    for group, key, what in (("model", "name", "model.name"), ("data", "name", "data.name"),
                             ("experiment", "id", "experiment.id")):
        section = plain.get(group) or {}
        if key in section:
            check_name(section[key], what)
