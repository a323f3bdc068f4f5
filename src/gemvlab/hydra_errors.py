"""Hydra's composition errors, rewritten as one line that names the problem and the fix."""

from __future__ import annotations

import re
from collections.abc import Sequence


def explain(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    text = str(exc)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, value = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        choices = f": choose one of {', '.join(options)}" if options else ""
        return f"unknown {group} '{value}'{choices} (override {group}=<name>)"
    unknown_group = re.search(r"Could not find '([^']+)'", text)
    if unknown_group:
        return (f"unknown config '{unknown_group.group(1)}': "
                "see the groups under conf/ and experiments/*/conf/")
    bad_key = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' is not in struct", text)
    if bad_key:
        key = bad_key.group(1)
        return (f"unknown config key '{key}': check its spelling against "
                "`python -m gemvlab.stages.<stage> --cfg job` (new keys need a leading +)")
    if "OverrideParseException" in type(exc).__name__ or "mismatched input" in text:
        return f"cannot parse overrides {' '.join(overrides)}: {text.splitlines()[0]}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"bad configuration: {first}"
