"""One work item of the caching job: score every view of one (epoch, shard). No Ray here.

:func:`run_item` reads the shard, replays the augmentation plan for every sample and view
(``pipeline.replay``), scores the images with the teacher in batches and writes the rows
through ``storage`` (data first, the item's done marker last). Tests and benchmarks call it
directly; the Ray job (``pipeline.cache``) calls it inside its actors.

Decoding + augmentation run in ``cfg.num_workers`` DataLoader processes, one part (about a
teacher batch of mix pairs) of one view per task; results come back in order and teacher
batches are fixed slices of the item's rows, so the stored values do not depend on the
worker count or timing.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class ItemResult:
    """What one work item did.

    images: rows written (= scored images); skipped: one dict per row not written
    (shard, key, epoch, view, reason); seconds: wall time of the item.
    """

    epoch: int
    shard_index: int
    shard: str
    images: int
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _ReplayParts(torch.utils.data.Dataset):
    """Element i = the replayed items of one part of one view of a shard.

    A part is a contiguous slice of ``part_pairs`` mix pairs, so one view spreads over all
    decode workers and the teacher starts scoring before a whole view is replayed.
    Parts are listed view-major in pair order: concatenated, they give the same rows in the
    same order as replaying each view whole.
    """

    def __init__(self, samples, shard, cfg, epoch: int, out_size: int, num_classes: int, part_pairs: int,
                 cut):
        from pipeline.schedule import shard_pairs

        self.samples, self.shard, self.cfg = samples, shard, cfg
        self.epoch, self.out_size, self.num_classes = epoch, out_size, num_classes
        self.parts = []
        for view in range(cfg.views):
            pairs = shard_pairs(cut, view, shard)  # partners from the sample's student-epoch part
            self.parts += [(view, pairs[i:i + part_pairs]) for i in range(0, len(pairs), part_pairs)]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from pipeline.replay import replay_items

        view, pairs = self.parts[index]
        skipped: list = []
        items = list(replay_items(self.samples, self.shard, self.cfg.aug, self.cfg.seed, self.epoch, view,
                                  self.out_size, self.num_classes, pairs, skipped=skipped))
        return {
            "image": torch.stack([it.image for it in items]) if items else None,
            "sample_id": np.array([it.sample_id for it in items], dtype=np.int64),
            "view": np.full(len(items), view, dtype=np.int64),
            "skipped": skipped,  # replay's records: {shard, key, sample_id, epoch, view, reason}
        }


def _slices(samples, shard, cfg, epoch, out_size, num_classes, cut):
    """Yield the replayed parts in order, made in ``cfg.num_workers`` processes (0 = here)."""
    workers = cfg.num_workers
    # about one teacher batch per part (a pair gives two rows)
    dataset = _ReplayParts(samples, shard, cfg, epoch, out_size, num_classes, max(1, cfg.batch_size // 2), cut)
    if workers == 0:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                         num_workers=min(workers, len(dataset)),
                                         collate_fn=_identity, worker_init_fn=_one_thread,
                                         multiprocessing_context="fork")
    yield from loader


def _identity(x):
    return x


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decode workers run side by side with the teacher's threads


def _maybe_die(fault_marker: str | None) -> None:
    """Test hook: the first process to get here with ``fault_marker`` set exits hard, once."""
    if fault_marker and not os.path.exists(fault_marker):
        with open(fault_marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(3)


def run_item(cfg, epoch: int, shard_index: int, teacher=None, writer=None, *, manifest=None,
             fault_marker: str | None = None) -> ItemResult:
    """Cache one (epoch, shard) work item.

    Args:
        cfg: a ``pipeline.cache.CacheJobConfig``.
        teacher: a built ``teacher.model.Teacher`` (built from ``cfg`` on CPU if None).
        writer: a ``storage.CacheWriter`` (created/reopened from ``cfg`` if None). A cache without
            its tail basis yet is calibrated first (``pipeline.calibrate``); the Ray job does that
            once before handing out items, so parallel actors never race on it.
        manifest: the loaded manifest of ``cfg.shards`` (loaded if None).
        fault_marker: test hook, see :func:`_maybe_die`.

    Returns:
        ItemResult. Corrupt samples become skip records (also stored with the item).

    Raises:
        ShardError naming the shard for a missing/truncated tar; nothing is written then.
    """
    from pipeline.cache import cache_attrs, make_teacher, open_writer
    from pipeline.calibrate import calibrate_tail
    from pipeline.schedule import epoch_cut
    from pipeline.shards import load_manifest, read_shard

    t0 = time.perf_counter()
    manifest = manifest if manifest is not None else load_manifest(cfg.shards)
    if not 0 <= shard_index < len(manifest.shards):
        raise IndexError(f"{cfg.shards}: shard index {shard_index} not in [0, {len(manifest.shards)})")
    if not 0 <= epoch < cfg.epochs:
        raise IndexError(f"{cfg.out}: epoch {epoch} not in [0, {cfg.epochs})")
    teacher = teacher if teacher is not None else make_teacher(cfg, "cpu")
    writer = writer if writer is not None else open_writer(cfg, manifest, cache_attrs(cfg, manifest))
    calibrate_tail(cfg, manifest, teacher, writer)  # no-op once the cache holds its tail basis
    shard = manifest.shards[shard_index]
    samples = read_shard(manifest.url(shard), shard)  # ShardError names the shard

    ids, views, logprobs, indices, logits, skipped = [], [], [], [], [], []
    buffer: list[torch.Tensor] = []  # images not yet scored, in row order

    def score(final: bool) -> None:
        # fixed batches of cfg.batch_size over the item's rows: logits never depend on slicing
        nonlocal buffer
        images = torch.cat(buffer) if len(buffer) > 1 else buffer[0]
        stop = len(images) if final else len(images) - len(images) % cfg.batch_size
        for start in range(0, stop, cfg.batch_size):
            out = teacher.score(images[start:min(start + cfg.batch_size, stop)])
            logprobs.append(out.logprobs.float().cpu().numpy())
            indices.append(out.indices.cpu().numpy())
            logits.append(out.logits.cpu().numpy())  # full: exact tail mass, tail code, fidelity
            _maybe_die(fault_marker)
        buffer = [images[stop:]] if stop < len(images) else []

    cut = epoch_cut(cfg.seed, epoch, cfg.views)
    for piece in _slices(samples, shard, cfg, epoch, teacher.cfg.input_size, cfg.teacher.num_classes, cut):
        skipped.extend(piece["skipped"])
        if piece["image"] is None:
            continue
        ids.append(piece["sample_id"])
        views.append(piece["view"])
        buffer.append(piece["image"])
        if sum(len(b) for b in buffer) >= cfg.batch_size:
            score(final=False)
    if buffer:
        score(final=True)

    k = cfg.k
    writer.write_item(
        epoch, shard_index,
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate(views) if views else np.zeros(0, np.int64),
        np.concatenate(logprobs) if logprobs else np.zeros((0, k), np.float32),
        np.concatenate(indices) if indices else np.zeros((0, k), np.int64),
        missing=skipped,
        logits=np.concatenate(logits) if logits else np.zeros((0, cfg.teacher.num_classes), np.float32),
    )
    n = sum(len(x) for x in ids)
    return ItemResult(epoch=epoch, shard_index=shard_index, shard=shard.name, images=n,
                      skipped=skipped, seconds=time.perf_counter() - t0)
