"""One work item of the caching job: score every view of one (epoch, shard). No Ray here.

:func:`run_item` takes the item's rows from an :class:`ItemFeed`, scores them with the teacher
in fixed batches and writes them through ``storage`` (data first, the item's done marker
last). Tests and benchmarks call it directly; the Ray job (``pipeline.cache``) calls it inside
its actors, each of which keeps one feed for its whole life.

The feed keeps the teacher busy:

* its replay workers (``pipeline.pool``) are started once and serve every item;
* a feeder thread reads the shard of each started item and hands groups of its samples to
  the workers, so the next item (``prefetch``) is replayed while the teacher scores this one;
* a worker decodes each sample once and augments it for every view (``pipeline.premix``); the
  rows are then finished (normalize, erase, mix with the partner) next to the teacher, in a
  thread that batches ahead of it, into pinned memory when the teacher is on CUDA.

Stored values do not depend on the worker count or timing: rows come in a fixed order
(view-major, then mix-pair order), teacher batches are fixed slices of it, and every pixel is
a pure function of the plan.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.plan import finish, mix_pairs
from pipeline.pool import make_pool
from pipeline.premix import Premix, premix
from pipeline.replay import ReplayItem, replay_items
from pipeline.shards import SampleError, ShardInfo, read_shard
from teacher.device import pin_memory

GROUP_SAMPLES = 8  # samples per worker task: ~24 images at 3 views, tens of ms of work


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


def item_pairs(cfg, epoch: int, view: int, shard: ShardInfo) -> list[tuple[int, int]]:
    """The (sample, partner) rows of one view of an item, in row order (the one pairing call)."""
    return mix_pairs(cfg.seed, epoch, view, shard)


class _Item:
    """One started (epoch, shard): its samples, groups and the workers' results as they come."""

    def __init__(self, epoch: int, shard: ShardInfo):
        self.epoch, self.shard = epoch, shard
        self.samples: list | None = None
        self.error: BaseException | None = None
        self.pairs: list[list[tuple[int, int]]] = []
        self.group_of: dict[int, int] = {}
        self.tasks: list = []  # one pool handle per group, in group order
        self.premixes: dict[int, Premix] = {}
        self.pids: set[int] = set()
        self.cancelled = False
        self._cond = threading.Condition()

    def plan(self, samples: list, cfg) -> list[list]:
        """Set the samples; return the worker groups (row order: view 0 first, so it streams)."""
        self.pairs = [item_pairs(cfg, self.epoch, v, self.shard) for v in range(cfg.views)]
        order = list(dict.fromkeys(i for pairs in self.pairs for pair in pairs for i in pair))
        groups = [order[i:i + GROUP_SAMPLES] for i in range(0, len(order), GROUP_SAMPLES)]
        self.group_of = {sid: g for g, group in enumerate(groups) for sid in group}
        with self._cond:
            self.samples = samples
            self._cond.notify_all()
        return groups

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self._cond.notify_all()

    def add_task(self, task) -> None:
        with self._cond:
            self.tasks.append(task)
            self._cond.notify_all()

    def wait_samples(self) -> list:
        with self._cond:
            self._cond.wait_for(lambda: self.samples is not None or self.error is not None)
        if self.error is not None:
            raise self.error
        return self.samples

    def premix_of(self, sid: int) -> Premix:
        if sid not in self.premixes:
            g = self.group_of[sid]
            with self._cond:
                self._cond.wait_for(lambda: len(self.tasks) > g or self.error is not None)
            if self.error is not None:
                raise self.error
            for p in self.tasks[g].result():
                self.premixes[p.sample_id] = p
                self.pids.add(p.pid)
        return self.premixes[sid]

    def cancel(self) -> None:
        self.cancelled = True
        for task in self.tasks:
            task.cancel()
        self.fail(CancelledError(f"epoch {self.epoch} shard {self.shard.name}: replay cancelled"))


class ItemFeed:
    """Replays (epoch, shard) items for one teacher, ahead of it, with persistent workers.

    Args:
        cfg: a ``pipeline.job.CacheJobConfig`` (plan, views, ``replay``, ``num_workers``).
        manifest: the loaded manifest of ``cfg.shards``.
        out_size: the teacher's input size.
        pool: the replay workers (default ``pool.make_pool(cfg.replay, cfg.num_workers)``,
            closed with the feed).
        read: ``read(url, shard) -> [RawSample]``; raises ShardError naming the shard.
    """

    def __init__(self, cfg, manifest, out_size: int, pool=None, read: Callable = read_shard):
        self.cfg, self.manifest, self.out_size, self.read = cfg, manifest, out_size, read
        self.pool = pool if pool is not None else make_pool(cfg.replay, cfg.num_workers)
        self._slots = threading.Semaphore(self.pool.depth) if self.pool.depth else None
        self._items: dict[tuple[int, int], _Item] = {}
        self._todo: queue.Queue = queue.Queue()
        self._feeder = threading.Thread(target=self._feed, name="replay-feeder", daemon=True)
        self._feeder.start()

    def start(self, epoch: int, shard_index: int) -> None:
        """Begin replaying an item in the background (after the items started before it)."""
        key = (epoch, shard_index)
        if key not in self._items:
            self._items[key] = _Item(epoch, self.manifest.shards[shard_index])
            self._todo.put(self._items[key])

    def keep(self, *keys) -> None:
        """Drop started items other than ``keys`` (a prefetch the job did not ask for after all)."""
        for key in [k for k in self._items if k not in keys]:
            self._items.pop(key).cancel()

    def rows(self, epoch: int, shard_index: int, skipped: list, pids: set | None = None) -> Iterator[ReplayItem]:
        """The item's finished rows (mixed images + targets) in its fixed order.

        Corrupt samples become skip records in ``skipped`` (their rows and the rows mixing
        them in); ``pids`` collects the worker processes that replayed the item. Raises
        ShardError naming the shard for a missing or truncated tar.
        """
        self.start(epoch, shard_index)
        item = self._items[epoch, shard_index]
        try:
            samples = item.wait_samples()
            aug, views = self.cfg.aug, self.cfg.views
            for view in range(views):
                yield from replay_items(samples, item.shard, aug, self.cfg.seed, epoch, view, self.out_size,
                                        self.manifest.num_classes, skipped=skipped, pairs=item.pairs[view],
                                        premixed=partial(self._finished, item, view))
        finally:
            self._items.pop((epoch, shard_index), None)
            if pids is not None:
                pids.update(item.pids)

    def _finished(self, item: _Item, view: int, sid: int):
        p = item.premix_of(sid)
        if p.error is not None:
            return SampleError(p.error, shard=item.shard.name)
        pixels, p.pixels[view] = p.pixels[view], None  # each view's image is finished once
        return p.params[view], finish(pixels, p.params[view], self.cfg.aug)

    def _feed(self) -> None:
        while (item := self._todo.get()) is not None:
            if item.cancelled:
                continue
            try:
                samples = self.read(self.manifest.url(item.shard), item.shard)
                by_id = {s.sample_id: s for s in samples}
                groups = item.plan(samples, self.cfg)
            except BaseException as exn:  # ShardError, or a bug: raised where the rows are read
                item.fail(exn)
                continue
            for group in groups:
                if item.cancelled:
                    break
                if self._slots is not None:
                    self._slots.acquire()
                task = self.pool.submit(premix, [by_id[s] for s in group], self.cfg.aug, self.cfg.seed,
                                        item.epoch, self.cfg.views, self.out_size)
                if self._slots is not None:
                    task.add_done_callback(lambda _t: self._slots.release())
                item.add_task(task)

    def close(self) -> None:
        """Stop the feeder and the workers."""
        self.keep()
        self._todo.put(None)
        self._feeder.join(timeout=10)
        self.pool.close()


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """One teacher batch: images [B, 3, S, S] float32 (pinned for a CUDA teacher) and row keys."""

    images: torch.Tensor
    sample_id: np.ndarray
    view: np.ndarray


def batches(rows: Iterator[ReplayItem], batch_size: int, pin: bool) -> Iterator[Batch]:
    """Fixed slices of ``batch_size`` rows (the last may be smaller): logits never depend on timing."""
    chunk: list[ReplayItem] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield _stack(chunk, pin)
            chunk = []
    if chunk:
        yield _stack(chunk, pin)


def _stack(rows: list[ReplayItem], pin: bool) -> Batch:
    first = rows[0].image
    images = torch.empty((len(rows), *first.shape), dtype=first.dtype, pin_memory=pin)
    torch.stack([r.image for r in rows], out=images)
    return Batch(images, np.array([r.sample_id for r in rows], dtype=np.int64),
                 np.array([r.view for r in rows], dtype=np.int64))


class Ahead:
    """Iterate ``source`` in a thread, up to ``depth`` items ahead of the reader.

    The reader gets the items in order, and the thread's exception at the point it happened.
    Closing (or leaving the ``with`` block) stops the thread.
    """

    _END = object()

    def __init__(self, source: Iterator, depth: int = 2):
        self._source, self._queue, self._stop = source, queue.Queue(depth), threading.Event()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def _put(self, x) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for x in self._source:
                if not self._put((x, None)):
                    return
            self._put((self._END, None))
        except BaseException as exn:  # handed to the reader
            self._put((self._END, exn))

    def __iter__(self):
        while True:
            x, error = self._queue.get()
            if error is not None:
                raise error
            if x is self._END:
                return
            yield x

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        close = getattr(self._source, "close", None)
        if close is not None and not self._thread.is_alive():
            close()  # runs the generators' finally blocks

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- the item


def _maybe_die(fault_marker: str | None) -> None:
    """Test hook: the first process to get here with ``fault_marker`` set exits hard, once."""
    if fault_marker and not os.path.exists(fault_marker):
        with open(fault_marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(3)


def run_item(cfg, epoch: int, shard_index: int, teacher=None, writer=None, *, manifest=None,
             feed: ItemFeed | None = None, prefetch: tuple[int, int] | None = None,
             fault_marker: str | None = None) -> ItemResult:
    """Cache one (epoch, shard) work item.

    Args:
        cfg: a ``pipeline.job.CacheJobConfig``.
        teacher: a built ``teacher.model.Teacher`` (built from ``cfg`` on CPU if None).
        writer: a ``storage.CacheWriter`` (created/reopened from ``cfg`` if None).
        manifest: the loaded manifest of ``cfg.shards`` (loaded if None).
        feed: the caller's persistent :class:`ItemFeed` (else one is made for this item).
        prefetch: the (epoch, shard) this feed will be asked for next: replayed while the
            teacher scores this item.
        fault_marker: test hook, see :func:`_maybe_die`.

    Returns:
        ItemResult. Corrupt samples become skip records (also stored with the item).

    Raises:
        ShardError naming the shard for a missing/truncated tar; nothing is written then.
    """
    from pipeline.job import cache_attrs, make_teacher, open_writer
    from pipeline.shards import load_manifest

    t0 = time.perf_counter()
    manifest = manifest if manifest is not None else load_manifest(cfg.shards)
    if not 0 <= shard_index < len(manifest.shards):
        raise IndexError(f"{cfg.shards}: shard index {shard_index} not in [0, {len(manifest.shards)})")
    if not 0 <= epoch < cfg.epochs:
        raise IndexError(f"{cfg.out}: epoch {epoch} not in [0, {cfg.epochs})")
    teacher = teacher if teacher is not None else make_teacher(cfg, "cpu")
    own_feed = feed is None
    feed = feed if feed is not None else ItemFeed(cfg, manifest, teacher.cfg.input_size)
    feed.keep((epoch, shard_index), prefetch)
    feed.start(epoch, shard_index)
    if prefetch is not None:
        feed.start(*prefetch)
    try:
        writer = writer if writer is not None else open_writer(cfg, manifest, cache_attrs(cfg, manifest))
        skipped: list[dict] = []
        ids, views, logprobs, indices = [], [], [], []
        pids: set[int] = set()
        rows = feed.rows(epoch, shard_index, skipped, pids)
        wait = 0.0
        with Ahead(batches(rows, cfg.batch_size, pin_memory(teacher.device))) as ahead:
            waited = time.perf_counter()
            for batch in ahead:
                wait += time.perf_counter() - waited
                out = teacher.score(batch.images)
                ids.append(batch.sample_id)
                views.append(batch.view)
                logprobs.append(out.logprobs.float().cpu().numpy())
                indices.append(out.indices.cpu().numpy())
                _maybe_die(fault_marker)
                waited = time.perf_counter()
        k = cfg.k
        writer.write_item(
            epoch, shard_index,
            np.concatenate(ids) if ids else np.zeros(0, np.int64),
            np.concatenate(views) if views else np.zeros(0, np.int64),
            np.concatenate(logprobs) if logprobs else np.zeros((0, k), np.float32),
            np.concatenate(indices) if indices else np.zeros((0, k), np.int64),
            missing=skipped,
        )
    finally:
        if own_feed:
            feed.close()
    n = sum(len(x) for x in ids)
    return ItemResult(epoch=epoch, shard_index=shard_index, shard=manifest.shards[shard_index].name, images=n,
                      skipped=skipped, seconds=time.perf_counter() - t0, wait_seconds=wait,
                      worker_pids=sorted(pids))
