"""One training epoch: forward, loss, backward with accumulation, update, EMA, schedule.

``train_epoch(parts, step, batches, state)``: the live objects of the run (:class:`LoopParts`),
how micro-batches become updates (:class:`StepConfig`, values), and what changes per epoch (the
batches, the position ``state``). An update (optimizer, scheduler, EMA) happens in one place.

The step is generic: where the teacher targets come from (cache, online teacher, none)
is hidden behind ``targets_fn(batch) -> TeacherTargets | None`` built in
:mod:`student.targets`, so there is no feature branch inside the loop.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from student import distributed as dist
from teacher.device import AMP_MODES


@dataclass
class LoopState:
    """Position of the run, saved in checkpoints (epoch boundaries)."""

    epoch: int = 0         # next epoch to train
    step: int = 0          # micro-batches seen over the whole run
    update: int = 0        # optimizer updates over the whole run


@dataclass
class Precision:
    """Autocast settings: ``dtype=None`` means plain fp32."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def precision_choice(amp: str, device_type: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed) for ``run.amp`` on a device.

    'auto' = bf16 on CUDA (fp32's exponent range: no loss scaling), fp32 elsewhere; 'fp16' is
    DeiT's ``torch.cuda.amp.autocast()`` + ``NativeScaler``: fp16 underflows small gradients, so
    the loss is scaled. Pure, so the CUDA decisions are tested on CPU.
    """
    if amp == "auto":
        amp = "bf16" if device_type == "cuda" else "none"
    if amp == "none":
        return None, False
    if amp == "bf16":
        return torch.bfloat16, False
    if amp == "fp16":
        return torch.float16, True
    raise ValueError(f"run.amp must be {'|'.join(AMP_MODES)}, found {amp!r}")


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """The :class:`Precision` of :func:`precision_choice` (a GradScaler on ``device`` for fp16)."""
    dtype, scaled = precision_choice(amp, device.type)
    return Precision(device.type, dtype, torch.amp.GradScaler(device.type) if scaled else None)


@dataclass
class EpochStats:
    """Running sums for one epoch (reduced over ranks at the end)."""

    sums: dict = field(default_factory=lambda: {"loss": 0.0, "base": 0.0, "distill": 0.0})
    images: float = 0.0
    dropped: float = 0.0
    seconds: float = 0.0
    wait_s: float = 0.0    # of ``seconds``, blocked on teacher-cache items not written yet

    def add(self, parts: dict, n: int) -> None:
        for key in self.sums:
            self.sums[key] += float(parts[key]) * n
        self.images += n

    def reduced(self) -> dict:
        names = list(self.sums)
        totals = dist.all_reduce_sum([self.sums[k] for k in names] + [self.images, self.dropped])
        images, dropped = totals[-2], totals[-1]
        out = {k: v / max(images, 1.0) for k, v in zip(names, totals)}
        # Throughput of the slowest rank decides the global rate; time spent waiting for the
        # caching job is not the student's speed, so it is left out and reported on its own.
        busy, wait_s = dist.all_reduce_max([self.seconds - self.wait_s, self.wait_s])
        out.update(images=images, dropped=dropped, images_per_s=images / max(busy, 1e-9), wait_s=wait_s)
        return out


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@dataclass(frozen=True)
class StepConfig:
    """How micro-batches become optimizer updates: values fixed for the run."""

    accum_steps: int = 1              # micro-batches per optimizer update
    clip_grad: float | None = None    # max gradient norm; None = no clipping
    num_batches: int | None = None    # micro-batches per epoch (equal on every rank); None = until batches end


@dataclass(frozen=True)
class LoopParts:
    """The live objects every epoch trains with, built once per run (:mod:`student.train`).

    Args:
        model: what trains (DDP-wrapped under torchrun); the EMA follows it.
        loss_fn: ``(outputs, target, teacher) -> {"loss", "base", "distill"}``.
        targets_fn: ``batch -> TeacherTargets | None`` (:mod:`student.targets`).
        optimizer, precision, device: as built by the trainer.
        scheduler: timm scheduler, told ``step_update(update)`` after every update; None = fixed lr.
        ema: ``ModelEmaV3`` updated after every update; None = no EMA.
        on_step: called after every micro-batch with epoch, step, update, lr and the loss parts.
        wait_clock: seconds spent so far waiting for the teacher cache (a counter);
            images_per_s leaves that time out and ``wait_s`` reports it.
    """

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    targets_fn: Callable[[dict], object]
    optimizer: torch.optim.Optimizer
    precision: Precision
    device: torch.device
    scheduler: Any = None
    ema: Any = None
    on_step: Callable[[dict], None] | None = None
    wait_clock: Callable[[], float] | None = None


def train_epoch(parts: LoopParts, step: StepConfig, batches: Iterable[dict], state: LoopState,
                progress=None) -> dict:
    """Train over ``batches`` (dicts from :class:`student.data.TrainData`), advancing ``state``.

    Every ``step.accum_steps`` micro-batches (and at the end of the epoch) the weights take one
    update (:func:`_update`: optimizer, scheduler, EMA). ``progress`` (a tqdm bar) moves per batch.

    Returns:
        Epoch metrics reduced over ranks: loss, base, distill, images, dropped, images_per_s, wait_s.

    Raises:
        FloatingPointError: a non-finite loss, naming the epoch and step.
    """
    parts.model.train()
    stats = EpochStats()
    parts.optimizer.zero_grad(set_to_none=True)
    pending = 0
    waited = parts.wait_clock or (lambda: 0.0)
    start, wait_start = time.perf_counter(), waited()
    for i, batch in enumerate(dist.lockstep(batches)):
        if step.num_batches is not None and i >= step.num_batches:
            break
        stats.dropped += float(batch.pop("dropped", 0))
        batch = _to_device(batch, parts.device)
        updates = pending + 1 == step.accum_steps or (step.num_batches is not None and i == step.num_batches - 1)
        with _grad_sync(parts.model, updates):
            losses = _backward(parts, batch, step.accum_steps, state)
        pending += 1
        state.step += 1
        stats.add(losses, int(batch["image"].shape[0]))
        if updates:
            _update(parts, step.clip_grad, state)
            pending = 0
        if parts.on_step is not None:
            parts.on_step({"epoch": state.epoch, "step": state.step, "update": state.update,
                           "lr": parts.optimizer.param_groups[0]["lr"], **losses})
        if progress is not None:
            elapsed = time.perf_counter() - start - (waited() - wait_start)
            progress.set_postfix(loss=f"{losses['loss']:.4f}", img_s=f"{stats.images / max(elapsed, 1e-9):.0f}",
                                 refresh=False)
            progress.update(1)
    if pending:
        # Epoch ended mid-accumulation (unknown length): flush so epochs are self-contained.
        _update(parts, step.clip_grad, state)
    stats.seconds = time.perf_counter() - start
    stats.wait_s = waited() - wait_start
    metrics = stats.reduced()
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite mean loss at epoch {state.epoch}")
    return metrics


def _grad_sync(model: torch.nn.Module, sync: bool):
    """DDP: skip the gradient all-reduce on micro-batches that do not update."""
    return model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()


def _backward(parts: LoopParts, batch: dict, accum_steps: int, state: LoopState) -> dict[str, float]:
    """Forward and backward of one micro-batch (gradients accumulate); returns the loss parts."""
    teacher = parts.targets_fn(batch)
    with parts.precision.autocast():
        outputs = parts.model(batch["image"])
        losses = parts.loss_fn(outputs, batch["target"], teacher)
    loss = losses["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss {loss.item()} at epoch {state.epoch} step {state.step} (update {state.update})"
        )
    scaled = loss / accum_steps
    if parts.precision.scaler is not None:
        parts.precision.scaler.scale(scaled).backward()
    else:
        scaled.backward()
    return {k: v.detach().float().item() for k, v in losses.items()}


def _update(parts: LoopParts, clip_grad: float | None, state: LoopState) -> None:
    """One optimizer update from the accumulated gradients; the schedule and the EMA follow it."""
    optimizer, scaler = parts.optimizer, parts.precision.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(parts.model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.update += 1
    if parts.scheduler is not None:
        parts.scheduler.step_update(num_updates=state.update)
    if parts.ema is not None:
        parts.ema.update(parts.model, step=state.update)
