"""A toy method family for the plug-in test: one runner of a stage no other family has."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from gemvlab.registry import runner
from gemvlab.stage import StageContext


@runner("weight_norms", "toy")
def weight_norms(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """Frobenius norm of each linear layer's weight, raised to ``toy.power``."""
    import torch

    from gemvlab.models.load import load_model

    model, _ = load_model(cfg.model, Path(cfg.paths.resources))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    power = float(cfg.toy.power)
    return {f"norm/{i}/fro": float(m.weight.norm()) ** power for i, m in enumerate(linears)}
