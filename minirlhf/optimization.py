"""AdamW and the learning-rate schedule of a run: the parameter groups (weight decay on matrices only), the
optimizer built from [train], and warmup then cosine, linear or constant decay. The trainer advances the
schedule, once per trainer step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from minirlhf.errors import TrainingError

if TYPE_CHECKING:
    from minirlhf.config import TrainSection


def decay_groups(module: nn.Module, lr: float | None = None) -> list[dict[str, Any]]:
    """A module's trainable parameters as two AdamW groups: weight decay on matrices except embeddings
    ("weight_decay": None means [train] weight_decay), none on norms, biases and embeddings. `lr`
    overrides [train] lr for both groups (ppo's critic)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": None}, {"params": no_decay, "weight_decay": 0.0}]
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return groups


def adamw(groups: list[dict[str, Any]], train: TrainSection, fused: bool = False) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, decoupled weight decay) over a stage's parameter groups: a group's
    "weight_decay": None becomes [train] weight_decay, a group without "lr" gets [train] lr; empty groups are
    dropped, and no trainable parameter at all is a TrainingError."""
    for g in groups:
        if g.get("weight_decay") is None:
            g["weight_decay"] = train.weight_decay
        g.setdefault("lr", train.lr)
        g["initial_lr"] = g["lr"]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TrainingError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.adam_eps, fused=fused)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup over `warmup` steps, then cosine (Loshchilov
    & Hutter 2017), linear or constant decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int,
                steps_done: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The [train] schedule over total_steps, `steps_done` steps in: lr = initial_lr * lr_factor(step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train.warmup_steps, total_steps, train.schedule, train.min_lr_ratio),
        last_epoch=steps_done - 1)
