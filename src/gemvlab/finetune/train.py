"""Causal-LM finetuning of the adapter parameters: the loop every method shares.

Every method sees the same token windows in the same order for a given seed (``batch_order``),
the same AdamW and the same schedule, so differences in loss, perplexity, time and memory come
from the method alone. A non-finite loss stops training and marks the run diverged instead of
crashing it: counting divergences is one of the measurements (QOFT against QLoRA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gemvlab.bench.timing import Stopwatch


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"train needs steps >= 0, batch_size >= 1 and lr > 0, got "
                             f"steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per finished step
    step_s: list[float] = field(default_factory=list)  # wall time of each step
    diverged: bool = False  # a loss or gradient went non-finite; training stopped there


def token_windows(ids: Tensor, seq_len: int) -> Tensor:
    """Non-overlapping windows [n, seq_len] of a token stream; the tail that does not fill
    a window is dropped."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens do not fill one window of seq_len={seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def batch_order(windows: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """Window indices [steps, batch_size]: seeded shuffles of all windows, one epoch after
    another, so every window is seen once before any is seen twice."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    epochs = [torch.randperm(windows, generator=gen) for _ in range(-(-need // windows))]
    flat = torch.cat(epochs) if epochs else torch.zeros(0, dtype=torch.long)
    return flat[:need].reshape(steps, batch_size)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to a tenth of it at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / span
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model: nn.Module, windows: Tensor, cfg: TrainConfig,
          on_step: Callable[[int, float, float], None] | None = None) -> TrainResult:
    """AdamW on the model's trainable parameters, next-token loss on windows [n, seq_len].

    ``on_step(step, loss, lr)`` is called after each step (loss curves, progress bars).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add adapters first")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = batch_order(windows.shape[0], cfg.steps, cfg.batch_size, cfg.seed)
    result = TrainResult()
    model.train()
    try:
        for step in range(cfg.steps):
            lr = learning_rate(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = windows[order[step]].to(device)
            with Stopwatch(device) as watch:
                loss = model(input_ids=batch, labels=batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        if cfg.grad_clip > 0 else torch.zeros(()))
                value = float(loss.detach())
                if not (math.isfinite(value) and math.isfinite(float(norm))):
                    result.diverged = True
                    break
                opt.step()
            result.step_s.append(watch.seconds)
            result.losses.append(value)
            if on_step is not None:
                on_step(step, value, lr)
    finally:
        model.eval()
    return result
