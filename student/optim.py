"""DeiT optimisation recipe: AdamW with lr scaled by batch size, warmup + cosine, EMA.

Two ways to step the lr (``optim.lr_step``), on the same timm schedule (linear warmup from
``warmup_lr`` over ``warmup_epochs``, then cosine to ``min_lr`` at ``epochs``)::

    scheduler = build_scheduler(optimizer, epochs, updates_per_epoch, lr_step=lr_step)
    num_updates = start_epoch * updates_per_epoch       # or the step restored from a checkpoint
    for epoch in range(start_epoch, epochs):
        for batch in loader:               # one optimizer.step() per accum_steps batches
            ...; optimizer.step(); num_updates += 1
            scheduler.step_update(num_updates)      # moves the lr only with lr_step="update"
        end_epoch(scheduler, epoch, lr_step)        # moves the lr only with lr_step="epoch"

- ``"update"`` (default): the schedule is counted in optimizer updates (timm's
  ``step_on_epochs=False``, train.py's ``--sched-on-updates``); update ``t`` trains at the
  schedule's value at ``t`` (construction sets update 0's). A smooth warmup, and a short run
  (a few epochs with warmup) is not spent at ``warmup_lr``.
- ``"epoch"``: DeiT exactly. DeiT's ``main.py`` builds timm's scheduler in epochs and calls
  ``lr_scheduler.step(epoch)`` *after* epoch ``epoch`` (not per update, and not
  ``step(epoch + 1)`` as timm's own train.py does), so epoch ``e`` trains at the value at
  ``max(e - 1, 0)``: epochs 0 and 1 at ``warmup_lr`` and the warmup ends one epoch later.
  Over 300 epochs the mean lr of the two agrees to 3 digits.

``updates_per_epoch`` counts optimizer steps (batches // accum_steps).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from student.config import OptimConfig

__all__ = ["scaled_lr", "peak_lr", "build_optimizer", "build_scheduler", "end_epoch", "lr_of_update", "ModelEma",
           "build_ema"]

ModelEma = ModelEmaV3


def scaled_lr(base_lr: float, batch_size: int, accum_steps: int = 1, base_batch: int = 512) -> float:
    """DeiT linear scaling: ``base_lr · (global batch · accum_steps) / base_batch`` (DeiT: 512)."""
    return base_lr * batch_size * accum_steps / float(base_batch)


def peak_lr(optim: OptimConfig, batch_size: int) -> float:
    """The run's lr: ``optim.lr`` when set, else :func:`scaled_lr` of ``optim.base_lr`` for the global batch."""
    if optim.lr is not None:
        return optim.lr
    return scaled_lr(optim.base_lr, batch_size, optim.accum_steps, optim.base_batch)


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
    lr_step: str = "update",
):
    """timm scheduler counted in optimizer updates (``lr_step="update"``) or in epochs (``"epoch"``).

    Linear warmup from ``warmup_lr`` to the optimizer's lr over ``warmup_epochs``, then
    ``sched`` (default cosine) down to ``min_lr`` at ``epochs``. Call ``step_update`` after
    every update and :func:`end_epoch` after every epoch; each moves the lr only in its mode.
    """
    if lr_step not in ("update", "epoch"):
        raise ValueError(f"scheduler: lr_step must be update|epoch, got {lr_step!r}")
    if updates_per_epoch <= 0:
        raise ValueError(f"scheduler: updates_per_epoch must be > 0, got {updates_per_epoch}")
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched,
        num_epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        step_on_epochs=lr_step == "epoch",
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def end_epoch(scheduler, epoch: int, lr_step: str) -> None:
    """After training epoch ``epoch`` (0-based). ``"epoch"``: ``step(epoch)``, as DeiT's main.py,
    so epoch ``epoch + 1`` trains at the schedule's value at ``epoch``. ``"update"``: a no-op
    for the lr (``step`` ignores a schedule counted in updates)."""
    scheduler.step(epoch if lr_step == "epoch" else epoch + 1)


def lr_of_update(scheduler, optimizer: Optimizer, update: int, updates_per_epoch: int, lr_step: str) -> float:
    """The lr optimizer update ``update`` (0-based, over the run) trains at; moves ``scheduler``
    there (for reports: the dry run's landmarks on a dummy optimizer)."""
    if lr_step == "epoch":
        scheduler.step(max(update // updates_per_epoch - 1, 0))
    else:
        scheduler.step_update(num_updates=update)
    return optimizer.param_groups[0]["lr"]


def build_ema(model: nn.Module, decay: float = 0.99996, device: str | None = None) -> ModelEmaV3:
    """EMA of the weights (DeiT: 0.99996). Update with ``ema.update(model, step=num_updates)``."""
    return ModelEmaV3(model, decay=decay, device=device)
