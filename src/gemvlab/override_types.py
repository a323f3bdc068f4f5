"""Overrides checked against the type of the value they replace, when the plan is composed:
`seed=abc` must stop there in one line, not as a traceback in the middle of a run."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from gemvlab.errors import GemvlabError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

_EXPECTED = {bool: "true or false", int: "an integer", float: "a number"}


def fits(default: Any, value: Any) -> bool:
    """Whether ``value`` may replace ``default``. Only an int, float or bool default has a
    type to keep; null is always accepted (it is how a knob is unset, e.g. a limit); a float
    takes an int (`lr=1`), and a bool never stands for a number."""
    if value is None or type(default) not in _EXPECTED:
        return True
    if type(default) is bool or isinstance(value, bool):
        return type(value) is type(default)
    return isinstance(value, int) if type(default) is int else isinstance(value, int | float)


def _sets_a_value(override: Override, cfg: DictConfig) -> bool:
    """A plain ``key=value``: not a group choice (its key holds a mapping in ``cfg``), an
    addition (+), a deletion (~), a package (@) or hydra's own."""
    from hydra.core.override_parser.types import OverrideType

    key = override.key_or_group
    node = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    return (override.type is OverrideType.CHANGE and override.package is None
            and "/" not in key and not key.startswith("hydra")
            and not isinstance(node, DictConfig))


def value_overrides(overrides: Sequence[str], cfg: DictConfig) -> dict[str, str]:
    """The plain ``key=value`` overrides among ``overrides`` (composed into ``cfg``), by key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group: o.input_line for o in parsed if _sets_a_value(o, cfg)}


def check_types(values: Mapping[str, str], defaults: DictConfig, cfg: DictConfig) -> None:
    """Refuse the first override in ``values`` (key -> its text) whose value in ``cfg`` does
    not fit the key's value in ``defaults`` (the config composed without those overrides)."""
    for key, text in values.items():
        default = OmegaConf.select(defaults, key, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if not fits(default, value):
            raise GemvlabError(f"{text}: expected {_EXPECTED[type(default)]}, like its default "
                               f"{json.dumps(default)}; fix the value or drop the override")
