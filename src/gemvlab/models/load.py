"""Load a fetched model: sha256-checked safetensors only, never pickle, no remote code; every
weight must come from the checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gemvlab.bench.models import random_lm
from gemvlab.data import data_dir, data_fetch_hint
from gemvlab.errors import GemvlabError
from gemvlab.manifest import verify_manifest
from gemvlab.models.checkpoint import check_readable, weight_mismatch
from gemvlab.models.fetch import model_dir, model_fetch_hint

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise GemvlabError(f"dtype '{name}' is unknown: use one of {', '.join(_DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise GemvlabError("scale asks for a CUDA GPU but torch sees none: use scale=cpu, or "
                           "install a CUDA build of torch (TORCH_SPEC=... bash scripts/setup.sh)")
    return torch.device(name)


def _weights_fix(cfg: Mapping[str, Any], hint: str) -> str:
    """A local model's fetch copies its source folder again, so that folder is what needs
    fixing; any other model is fetched afresh."""
    if cfg["source"] == "local":
        return (f"re-save {cfg['path']} with save_pretrained(folder, safe_serialization=True), "
                f"then {hint}")
    return hint


def _from_checkpoint(folder: Path, dtype: torch.dtype, fix: str) -> torch.nn.Module:
    """Load safetensors weights and refuse any weight the checkpoint did not fill (transformers
    would leave it random and only log a warning)."""
    from transformers import AutoModelForCausalLM

    # ignore_mismatched_sizes: a wrong shape comes back in the loading info, reported below in
    # one line with the missing and unexpected keys, instead of as a RuntimeError after a table.
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=False,
        output_loading_info=True, ignore_mismatched_sizes=True)
    problem = weight_mismatch(info)
    if problem:
        raise GemvlabError(f"{folder}'s weights do not fit {type(model).__name__} (transformers "
                           f"would fill the gaps at random): {problem}; {fix}")
    return model


def load_model(cfg: Mapping[str, Any], resources: Path, *, device: str = "cpu",
               seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """Returns (model in eval mode, tokenizer or None for random models)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = model_dir(resources, cfg["name"])
    hint = model_fetch_hint(cfg, resources)
    manifest = verify_manifest(folder, hint)
    check_readable([folder / rel for rel in manifest.get("files", {})], hint)
    dtype = torch_dtype(cfg.get("dtype", "float32"))
    dev = resolve_device(device)
    if cfg["source"] == "random":
        return random_lm(AutoConfig.from_pretrained(folder), dtype, dev, seed), None
    if not list(folder.glob("*.safetensors")):
        raise GemvlabError(f"{folder} has no safetensors weights: {hint}")
    model = _from_checkpoint(folder, dtype, _weights_fix(cfg, hint)).to(dev)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model.eval(), tokenizer


def load_run_model(cfg: DictConfig, resources: Path) -> tuple[torch.nn.Module, Any]:
    """A run's model and tokenizer, its eval datasets checked first; a random model (no
    tokenizer) is refused."""
    for name in cfg.eval.datasets:
        verify_manifest(data_dir(resources, name), data_fetch_hint(resources, name))
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True), resources,
                                  device=cfg.scale.device, seed=int(cfg.seed))
    if tokenizer is None:
        raise GemvlabError(f"model {cfg.model.name} has random weights and no tokenizer: "
                           "evaluate a packaged or hub model")
    return model, tokenizer
