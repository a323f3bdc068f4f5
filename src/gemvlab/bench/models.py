"""Causal LMs with seeded random weights: benchmarks time a paper's model shapes without
fetching its weights (speed does not depend on the values)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def random_lm(config: Any, dtype: torch.dtype, device: torch.device | str,
              seed: int) -> torch.nn.Module:
    """A causal LM of ``config`` (a transformers config) with weights seeded by ``seed``, built
    on ``device`` directly, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def paper_shape_lm(model_type: str, shape: Mapping[str, Any], dtype: torch.dtype,
                   device: torch.device | str, seed: int) -> torch.nn.Module:
    """``random_lm`` of a shape given as ``AutoConfig.for_model`` keywords (a benchmark
    config's ``model.shape``: hidden_size, num_hidden_layers, ...)."""
    from transformers import AutoConfig

    return random_lm(AutoConfig.for_model(model_type, **dict(shape)), dtype, device, seed)
