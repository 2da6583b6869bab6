"""Calibrate the learned tail (storage/tail.py) once, before the caching job writes any row.

The basis is fitted on the teacher's full logits of the first ``tail.calibration_rows`` rows of
epoch 0 (shards in order, every view), replayed exactly as the job will replay them. It is
global state of the cache: fitted once, stored by ``CacheWriter.write_tail`` before the first
item, and read back by every writer, every resumed job and every student, so all rows use the
same basis. The job calls :func:`calibrate_tail` in one place (one actor, before handing out
items); nothing else writes it.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.replay import ReplayRequest, replay_items
from pipeline.schedule import epoch_cut, shard_pairs
from pipeline.errors import ShardError
from pipeline.shards import read_shard
from storage.tail import TailModel


def calibration_logits(cfg, manifest, teacher, rows: int) -> np.ndarray:
    """Full teacher logits ``[n, C]`` of the first ``rows`` rows of epoch 0 (n may be smaller for a small dataset).

    An unreadable shard is passed over: its work items report it, naming the shard.
    """
    cut = epoch_cut(cfg.seed, 0, cfg.views)
    images: list[torch.Tensor] = []
    for shard in manifest.shards:
        try:
            raw = read_shard(manifest, shard)
        except ShardError:
            continue
        decoded: dict = {}
        for view in range(cfg.views):
            request = ReplayRequest(cfg.aug, cfg.seed, 0, view, teacher.cfg.input_size, cfg.teacher.num_classes)
            for item in replay_items(request, raw, shard, shard_pairs(cut, view, shard), skipped=[],
                                     decoded=decoded):
                images.append(item.image)
                if len(images) >= rows:
                    break
            if len(images) >= rows:
                break
        if len(images) >= rows:
            break
    out = [teacher.forward_logits(torch.stack(images[i:i + cfg.batch_size])).cpu().numpy()
           for i in range(0, len(images), cfg.batch_size)]
    return np.concatenate(out) if out else np.zeros((0, cfg.teacher.num_classes), np.float32)


def calibrate_tail(cfg, manifest, teacher, writer) -> bool:
    """Fit and store the cache's tail basis unless it is stored already (or not wanted).

    Args:
        cfg: the ``CacheJobConfig`` (``cfg.tail``: dim, step, calibration_rows).
        manifest: the loaded manifest of ``cfg.shards``.
        teacher: the job's teacher.
        writer: the cache's ``CacheWriter``.
    Returns:
        True when this call wrote the basis.
    """
    if writer.has_tail():
        return False
    logits = calibration_logits(cfg, manifest, teacher, cfg.tail.calibration_rows)
    if not len(logits):
        raise ValueError(f"{cfg.shards}: no readable row in epoch 0 to calibrate the tail basis on")
    writer.write_tail(TailModel.fit(logits, writer.tail_dim, cfg.tail.step))
    return True
