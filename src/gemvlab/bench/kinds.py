"""How a bench runner claims its runs (``bench.kind``) and where it may run (``bench.device``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig

from gemvlab.errors import GemvlabError

# A bench config without a kind is the first kind there was: the int8 linear-layer benchmark.
DEFAULT_KIND = "int8"


def bench_kind(kind: str) -> Callable[[Mapping[str, Any]], bool]:
    """The ``applies`` of a bench runner: runs whose bench config names ``kind``."""

    def applies(plain: Mapping[str, Any]) -> bool:
        bench = plain.get("bench") or {}
        return bench.get("name", "none") != "none" and bench.get("kind", DEFAULT_KIND) == kind

    return applies


def bench_on_cuda(plain: Mapping[str, Any]) -> bool:
    """A benchmark runs where its bench config says, whatever the scale."""
    return (plain.get("bench") or {}).get("device") == "cuda"


def require_device(bcfg: DictConfig) -> None:
    """Stop early, naming the fix, when a CUDA benchmark meets a machine without CUDA."""
    import torch

    if bcfg.device == "cuda" and not torch.cuda.is_available():
        # By convention a benchmark's GPU configs are <name>_gpu[_<size>], its CPU one <name>_cpu.
        cpu = re.sub(r"_gpu(_\w+)?$", "_cpu", str(bcfg.name))
        raise GemvlabError(f"bench={bcfg.name} needs a CUDA GPU and torch sees none: run it on a "
                           f"GPU machine (profile gpu), or bench={cpu} here")
