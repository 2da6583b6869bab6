"""A simulated accelerator, for benchmarks and tests only (not a user feature).

:class:`SleepingNet` stands in for a network on a GPU: its forward takes ``len(batch) /
images_per_s`` seconds of wall time by sleeping, which frees the CPU and the GIL the way a
GPU kernel does, and returns deterministic pseudo-logits computed from the pixels (a fixed
random projection of 4x4 average-pooled images), so a wrong pixel still shows in the output.
It has a small trainable head, so a student step (loss, backward, AdamW) works on it.

* teacher: ``teacher.callable: bench.simulated:sleeping_net`` with
  ``teacher.model_kwargs: {images_per_s: 400, num_classes: 1000}``;
* student: ``model.name: bench.simulated:sleeping_net`` with
  ``model.model_kwargs: {images_per_s: 400}`` (``student.models`` resolves ``module:fn``).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

_POOL = 4


class SleepingNet(nn.Module):
    """Pseudo-logits at a configured speed.

    Args:
        num_classes: logits per image.
        images_per_s: simulated throughput; each forward lasts at least ``batch / images_per_s``.
        seed: seed of the fixed projection.
        timeline: a file to which each forward appends ``<unix time> <batch size>`` when it
            starts (a benchmark reads the steady step rate from it, free of start-up and shutdown).
    """

    def __init__(self, num_classes: int = 1000, images_per_s: float = 100.0, seed: int = 0,
                 timeline: str | None = None):
        super().__init__()
        if images_per_s <= 0:
            raise ValueError(f"images_per_s must be positive, found {images_per_s}")
        self.images_per_s = float(images_per_s)
        self.timeline = timeline
        gen = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(3 * _POOL * _POOL, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if self.timeline:
            with open(self.timeline, "a") as f:
                f.write(f"{time.time():.6f} {len(x)}\n")
        logits = self.head(F.adaptive_avg_pool2d(x.float(), _POOL).flatten(1))
        time.sleep(max(0.0, len(x) / self.images_per_s - (time.perf_counter() - start)))
        return logits


def sleeping_net(num_classes: int = 1000, images_per_s: float = 100.0, seed: int = 0, timeline: str | None = None,
                 **_ignored) -> SleepingNet:
    """Factory for ``teacher.callable`` / ``model.name`` (ignores the student's timm kwargs
    such as ``img_size`` and ``drop_path_rate``)."""
    return SleepingNet(num_classes, images_per_s, seed, timeline)


def steady_rate(timeline: str, skip: int = 2) -> float:
    """Images/s between the starts of forward ``skip`` and the last one in a timeline file."""
    rows = [line.split() for line in open(timeline).read().splitlines()]
    times, sizes = [float(t) for t, _ in rows], [int(n) for _, n in rows]
    if len(rows) < skip + 2:
        raise ValueError(f"{timeline}: {len(rows)} forwards, need at least {skip + 2}")
    return sum(sizes[skip:-1]) / (times[-1] - times[skip])
