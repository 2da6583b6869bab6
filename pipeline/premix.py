"""The worker half of replay: decode each sample once and augment it for every view.

:func:`premix` is what a replay worker (a local process or a Ray task) runs on a group of a
shard's samples: one decode per sample, then ``plan.sample_params`` + ``plan.augment`` (the
uint8 PIL stage) for each view. The result, a :class:`Premix` per sample, is everything the
teacher's process needs to finish any row the sample appears in, as itself or as a mix
partner (``plan.finish`` + ``plan.mix`` in ``replay_items(premixed=...)``), so no sample is
decoded twice and workers, pipes and the object store carry uint8 pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.plan import AugConfig, AugParams, augment, sample_params
from pipeline.decode import decode_image
from pipeline.errors import SampleError
from pipeline.shards import RawSample


@dataclass
class Premix:
    """One sample's pre-mix images for views 0..V-1, or why it could not be decoded.

    Attributes:
        sample_id: the sample.
        params: the plan's decisions per view (empty when ``error``).
        pixels: per view, ``plan.augment``'s HWC uint8 image (empty when ``error``).
        error: the decode error message (a corrupt sample), else None.
        pid: the process that made it (shows which workers served an item).
    """

    sample_id: int
    params: tuple[AugParams, ...]
    pixels: list[np.ndarray]
    error: str | None
    pid: int


def premix(samples: Sequence[RawSample], cfg: AugConfig, seed: int, epoch: int, views: int,
           out_size: int) -> list[Premix]:
    """Decode each of ``samples`` once and augment it (uint8 stage) for every view.

    Args:
        samples: some samples of one shard.
        cfg, seed, epoch, out_size: the plan inputs; ``views``: views 0..views-1.

    Returns:
        A :class:`Premix` per sample, in the given order. A corrupt sample gets ``error``
        (the message names shard, key and sample_id) instead of raising.
    """
    out = []
    for raw in samples:
        try:
            image = decode_image(raw, cfg.exif_transpose, cfg.max_pixels)
        except SampleError as exn:
            out.append(Premix(raw.sample_id, (), [], str(exn), os.getpid()))
            continue
        params = tuple(sample_params(cfg, seed, epoch, raw.sample_id, v, image.size) for v in range(views))
        pixels = [augment(image, p, out_size, cfg) for p in params]
        out.append(Premix(raw.sample_id, params, pixels, None, os.getpid()))
    return out
