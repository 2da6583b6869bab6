"""One work item of the caching job: score every view of one (epoch, shard). No Ray here.

:func:`run_item` takes the item's batches from an :class:`~teacher.feed.ItemFeed` (replay
ahead of the teacher with persistent workers, each sample decoded once), scores them with the
teacher and writes the rows through ``storage`` (data first, the item's done marker last).
Tests and benchmarks call it directly; the Ray job (``teacher.cache``) calls it inside its
actors, each of which keeps one feed for its whole life and names the item it will ask for
next (``prefetch``), so the teacher never waits at an item boundary.

Stored values do not depend on the worker count or timing: the feed's rows come in a fixed
order, teacher batches are fixed slices of it, and every pixel is a pure function of the plan.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.manifest import load_manifest
from storage.cache import EncodedRows
from teacher.calibrate import calibrate_tail
from teacher.device import pin_memory
from teacher.feed import ItemFeed
from teacher import fidelity
from teacher.job import cache_attrs, make_teacher, open_writer


@dataclass
class ItemResult:
    """What one work item did.

    images: rows written (= scored images); skipped: one dict per row not written
    (shard, key, epoch, view, reason); seconds: wall time of the item; wait_seconds: time the
    teacher waited for replayed batches; worker_pids: processes that replayed its samples.
    """

    epoch: int
    shard_index: int
    shard: str
    images: int
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    wait_seconds: float = 0.0
    worker_pids: list[int] = field(default_factory=list)


def _maybe_die(fault_marker: str | None) -> None:
    """Test hook: the first process to get here with ``fault_marker`` set exits hard, once."""
    if fault_marker and not os.path.exists(fault_marker):
        with open(fault_marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(3)


@dataclass
class Scored:
    """The teacher's rows of one item, in row order, and what happened on the way."""

    sample_id: np.ndarray   # int64 [R]
    view: np.ndarray        # int64 [R]
    logprobs: np.ndarray    # float32 [R, k]
    indices: np.ndarray     # int64 [R, k]
    logits: np.ndarray      # float32 [R, C]: full, for the exact tail mass, tail code and fidelity
    skipped: list[dict]
    worker_pids: list[int]
    wait_seconds: float     # time the teacher waited for replayed batches


class RowEncoder:
    """Encodes each scored batch for storage (``CacheWriter.encode``, and measures the fidelity record
    of the item's first rows, ``teacher.fidelity.item_record``) on a background thread while the
    teacher scores the next batch, so the write at the item's end is only the chunk writes: the
    teacher idles less between items.
    Batches are encoded row for row as given, so the stored values are those of encoding the
    whole item at once."""

    def __init__(self, writer):
        self.writer, self.need = writer, fidelity.FIDELITY_ROWS  # read now: tests vary it
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kdcache-encode")
        self._parts: list = []
        self._first: list[np.ndarray] = []
        self._fidelity = None

    def add(self, logprobs: np.ndarray, indices: np.ndarray, logits: np.ndarray) -> None:
        self._parts.append(self._pool.submit(self.writer.encode, logprobs, indices, logits))
        if self._fidelity is None and self.need > 0:
            self._first.append(logits[:self.need])
            self.need -= len(self._first[-1])
            if self.need == 0:
                self._fidelity = self._pool.submit(fidelity.item_record, self.writer, np.concatenate(self._first))

    def result(self):
        """(EncodedRows of every row added, fidelity record): ``write_item``'s ``encoded``."""
        if self._fidelity is None and self._first:  # fewer rows than FIDELITY_ROWS in the item
            self._fidelity = self._pool.submit(fidelity.item_record, self.writer, np.concatenate(self._first))
        parts = [f.result() for f in self._parts]
        if not parts:
            return self.writer.encode(np.zeros((0, self.writer.k), np.float32), np.zeros((0, self.writer.k), np.int64),
                                      np.zeros((0, self.writer.num_classes), np.float32)), None
        return EncodedRows.concat(parts), (self._fidelity.result() if self._fidelity is not None else None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def score_item(feed: ItemFeed, teacher, epoch: int, shard_index: int, prefetch: tuple[int, int] | None = None,
               fault_marker: str | None = None, encoder: RowEncoder | None = None) -> Scored:
    """Score every row of (epoch, shard) from ``feed``; start replaying ``prefetch`` meanwhile;
    hand each batch's rows to ``encoder`` (if given) as they come.

    Raises ShardError naming the shard for a missing/truncated tar.
    """
    feed.keep((epoch, shard_index), prefetch)
    feed.start(epoch, shard_index)
    if prefetch is not None:
        feed.start(*prefetch)
    skipped: list[dict] = []
    pids: set[int] = set()
    ids, views, logprobs, indices, logits = [], [], [], [], []
    wait, waited = 0.0, time.perf_counter()
    with contextlib.closing(feed.batches(epoch, shard_index, skipped, pids)) as batches:
        for batch in batches:  # closed on an error too: the feed gets the batch's buffer back
            wait += time.perf_counter() - waited
            out = teacher.score(batch.images)
            ids.append(batch.sample_id)
            views.append(batch.view)
            logprobs.append(out.logprobs.float().cpu().numpy())
            indices.append(out.indices.cpu().numpy())
            logits.append(out.logits.cpu().numpy())
            if encoder is not None:
                encoder.add(logprobs[-1], indices[-1], logits[-1])
            feed.release(batch)  # after .cpu(): a non_blocking copy from it has completed
            _maybe_die(fault_marker)
            waited = time.perf_counter()
    k, c = teacher.k, teacher.num_classes
    return Scored(np.concatenate(ids) if ids else np.zeros(0, np.int64),
                  np.concatenate(views) if views else np.zeros(0, np.int64),
                  np.concatenate(logprobs) if logprobs else np.zeros((0, k), np.float32),
                  np.concatenate(indices) if indices else np.zeros((0, k), np.int64),
                  np.concatenate(logits) if logits else np.zeros((0, c), np.float32),
                  skipped, sorted(pids), wait)


def run_item(cfg, epoch: int, shard_index: int, teacher=None, writer=None, *, manifest=None,
             feed: ItemFeed | None = None, prefetch: tuple[int, int] | None = None,
             fault_marker: str | None = None) -> ItemResult:
    """Cache one (epoch, shard) work item.

    Args:
        cfg: a ``teacher.job.CacheJobConfig``.
        teacher: a built ``teacher.model.Teacher`` (built from ``cfg`` on CPU if None).
        writer: a ``storage.CacheWriter`` (created/reopened from ``cfg`` if None). A cache without
            its tail basis yet is calibrated first (``teacher.calibrate``); the Ray job does that
            once before handing out items, so parallel actors never race on it.
        manifest: the loaded manifest of ``cfg.shards`` (loaded if None).
        feed: the caller's persistent :class:`~teacher.feed.ItemFeed` (else one is made for
            this item and closed after it).
        prefetch: the (epoch, shard) this feed will be asked for next: replayed while the
            teacher scores this item.
        fault_marker: test hook, see :func:`_maybe_die`.

    Returns:
        ItemResult. Corrupt samples become skip records (also stored with the item).

    Raises:
        ShardError naming the shard for a missing/truncated tar; nothing is written then.
    """
    t0 = time.perf_counter()
    manifest = manifest if manifest is not None else load_manifest(cfg.shards)
    if not 0 <= shard_index < len(manifest.shards):
        raise IndexError(f"{cfg.shards}: shard index {shard_index} not in [0, {len(manifest.shards)})")
    if not 0 <= epoch < cfg.epochs:
        raise IndexError(f"{cfg.out}: epoch {epoch} not in [0, {cfg.epochs})")
    teacher = teacher if teacher is not None else make_teacher(cfg, "cpu")
    own_feed, encoder = feed is None, None
    if own_feed:
        feed = ItemFeed(cfg, manifest, teacher.cfg.input_size, pin=pin_memory(teacher.device))
    try:
        writer = writer if writer is not None else open_writer(cfg, manifest, cache_attrs(cfg, manifest))
        calibrate_tail(cfg, manifest, teacher, writer)  # no-op once the cache holds its tail basis
        encoder = RowEncoder(writer)
        scored = score_item(feed, teacher, epoch, shard_index, prefetch, fault_marker, encoder)
        writer.write_item(epoch, shard_index, scored.sample_id, scored.view, scored.logprobs, scored.indices,
                          missing=scored.skipped, logits=scored.logits, encoded=encoder.result)
    finally:
        if encoder is not None:
            encoder.close()
        if own_feed:
            feed.close()
    return ItemResult(epoch=epoch, shard_index=shard_index, shard=manifest.shards[shard_index].name,
                      images=len(scored.sample_id), skipped=scored.skipped, seconds=time.perf_counter() - t0,
                      wait_seconds=scored.wait_seconds, worker_pids=scored.worker_pids)
