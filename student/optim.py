"""DeiT optimisation recipe: AdamW with lr scaled by batch size, warmup + cosine, EMA.

Scheduler usage (per-update stepping, as DeiT/timm do with ``--sched-on-updates``)::

    scheduler = build_scheduler(optimizer, epochs, updates_per_epoch)
    num_updates = start_epoch * updates_per_epoch       # or the step restored from a checkpoint
    for epoch in range(start_epoch, epochs):
        for batch in loader:               # one optimizer.step() per accum_steps batches
            ...; optimizer.step(); num_updates += 1
            scheduler.step_update(num_updates)
        scheduler.step(epoch + 1)          # harmless no-op for lr with per-update stepping

The lr of update ``t`` is set by ``step_update(t)``; construction already sets the warmup lr
of update 0. ``updates_per_epoch`` counts optimizer steps (batches // accum_steps).
"""
from __future__ import annotations

from typing import Any

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim import Optimizer

__all__ = ["scaled_lr", "build_optimizer", "build_scheduler", "ModelEma", "build_ema"]

ModelEma = ModelEmaV3


def scaled_lr(base_lr: float, batch_size: int, accum_steps: int = 1) -> float:
    """DeiT linear scaling: ``base_lr · (global batch · accum_steps) / 512``."""
    return base_lr * batch_size * accum_steps / 512.0


def build_optimizer(
    model: nn.Module, opt: str = "adamw", lr: float = 5e-4, weight_decay: float = 0.05, **kw: Any
) -> Optimizer:
    """timm optimizer by name; no weight decay on biases, norms and ``no_weight_decay()`` params.

    Extra ``kw`` go to ``timm.optim.create_optimizer_v2`` (e.g. ``eps``, ``betas``, ``momentum``).
    """
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kw)


def build_scheduler(
    optimizer: Optimizer,
    epochs: int,
    updates_per_epoch: int,
    warmup_epochs: int = 5,
    min_lr: float = 1e-5,
    warmup_lr: float = 1e-6,
    sched: str = "cosine",
):
    """timm scheduler stepped per optimizer update (call ``step_update(num_updates)``).

    Linear warmup from ``warmup_lr`` to the optimizer's lr over ``warmup_epochs``, then
    ``sched`` (default cosine) down to ``min_lr`` at ``epochs``.
    """
    if updates_per_epoch <= 0:
        raise ValueError(f"scheduler: updates_per_epoch must be > 0, got {updates_per_epoch}")
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched,
        num_epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def build_ema(model: nn.Module, decay: float = 0.99996, device: str | None = None) -> ModelEmaV3:
    """EMA of the weights (DeiT: 0.99996). Update with ``ema.update(model, step=num_updates)``."""
    return ModelEmaV3(model, decay=decay, device=device)
