"""Stop at the first NaN or inf a model emits, instead of reporting a meaningless number."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gemvlab.errors import GemvlabError


def check_finite(tensor: torch.Tensor, where: str) -> None:
    # min and max propagate NaN and show inf: one pass, no mask as large as the logits
    if tensor.numel() and not torch.isfinite(torch.stack(tensor.aminmax())).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise GemvlabError(f"NaN or inf in model outputs ({bad} values, {where}): the weights or "
                           "the method produce non-finite values; check the model files and dtype")


@contextmanager
def finite_outputs(model: torch.nn.Module, where: str) -> Iterator[None]:
    """Check every forward's logits while the block runs (lm-eval calls the model itself)."""

    def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
        logits = getattr(output, "logits", output)
        if isinstance(logits, torch.Tensor):
            check_finite(logits, where)

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
