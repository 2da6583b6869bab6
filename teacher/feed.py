"""Replay ahead of the teacher: one actor's persistent replay workers, feeding finished batches.

An :class:`ItemFeed` lives as long as its teacher actor and turns started (epoch, shard) items
into teacher batches, in the order they were started:

* **workers** (``teacher.pool``, started once): a feeder thread reads each item's shard and
  hands groups of its samples to them; a worker decodes each sample once and augments it for
  every view (``pipeline.premix``), so nothing is decoded twice, for a view or as a partner;
* **batcher** (a thread next to the teacher): finishes each row (normalize, erase, mix with
  its partner: ``replay_items(premixed=...)``) into reusable batch buffers, pinned when the
  teacher is on CUDA, a few batches ahead of the teacher. When one item's rows are done it
  goes on with the next started item, so the teacher never waits at an item boundary.

Rows come in a fixed order (view-major, then mix-pair order) and batches are fixed slices of
it, so what the teacher sees does not depend on the worker count or timing.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.plan import finish
from teacher.pool import make_pool
from pipeline.premix import Premix, premix
from pipeline.replay import ReplayRequest, replay_items
from pipeline.schedule import epoch_cut, shard_pairs
from pipeline.errors import SampleError
from pipeline.manifest import ShardInfo
from pipeline.shards import read_shard

GROUP_SAMPLES = 8  # samples per worker task: ~24 images at 3 views, tens of ms of work
AHEAD = 2          # finished batches ready per item
_END = object()


def item_pairs(cfg, epoch: int, view: int, shard: ShardInfo) -> list[tuple[int, int]]:
    """The (sample, partner) rows of one view of an item, in row order (the one pairing call):
    the schedule's pairs, partners from the sample's student-epoch part (pipeline.schedule)."""
    return shard_pairs(epoch_cut(cfg.seed, epoch, cfg.views), view, shard)


@dataclass
class Batch:
    """One teacher batch: images [B, 3, S, S] float32 (a view of a reused buffer) and row keys."""

    images: torch.Tensor
    sample_id: np.ndarray
    view: np.ndarray
    buffer: torch.Tensor
    released: bool = False


class _Buffers:
    """Batch tensors, reused: a fresh 40 MB tensor per batch costs more in page faults than the
    copy into it, and pinned (page-locked) memory is slow to allocate."""

    def __init__(self, count: int, pin: bool):
        self._free: queue.Queue = queue.Queue()
        self._left, self._pin = count, pin

    def take(self, shape: tuple, stop: threading.Event) -> torch.Tensor | None:
        """A free buffer of ``shape`` (waits for one once ``count`` exist); None once ``stop`` is set."""
        while not stop.is_set():
            try:
                buf = self._free.get_nowait()
            except queue.Empty:
                if self._left > 0:
                    self._left -= 1
                    return torch.empty(shape, dtype=torch.float32, pin_memory=self._pin)
                try:
                    buf = self._free.get(timeout=0.1)
                except queue.Empty:
                    continue
            if tuple(buf.shape) != shape:
                buf = torch.empty(shape, dtype=torch.float32, pin_memory=self._pin)
            return buf
        return None

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)


class _Item:
    """One started (epoch, shard): samples, worker tasks, and its finished batches as they come."""

    def __init__(self, epoch: int, shard: ShardInfo):
        self.epoch, self.shard = epoch, shard
        self.samples: list | None = None
        self.error: BaseException | None = None
        self.pairs: list[list[tuple[int, int]]] = []
        self.group_of: dict[int, int] = {}
        self.tasks: list = []  # one pool handle per group, in group order
        self.premixes: dict[int, Premix] = {}
        self.pids: set[int] = set()
        self.skipped: list[dict] = []
        self.cancelled = False
        self.out: deque = deque()  # finished batches, then _END or an exception
        self._cond = threading.Condition()

    def plan(self, samples: list, cfg) -> list[list[int]]:
        """Set the samples; return the worker groups (view 0's rows first, so it streams)."""
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
            self.error = self.error or error
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

    def offer(self, x) -> bool:
        """Batcher side: queue ``x`` once there is room; False when the item was cancelled."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.out) < AHEAD or self.cancelled or x is _END
                                or isinstance(x, BaseException))
            if self.cancelled:
                return False
            self.out.append(x)
            self._cond.notify_all()
            return True

    def take(self):
        """Teacher side: the next batch, _END, or the exception that stopped the item."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self.out))
            x = self.out.popleft()
            self._cond.notify_all()
            return x

    def cancel(self) -> list:
        """Stop the item; returns the batches it had ready (their buffers go back)."""
        with self._cond:
            self.cancelled = True
            ready = [x for x in self.out if isinstance(x, Batch)]
            self.out.clear()
            self.error = self.error or CancelledError(f"epoch {self.epoch} shard {self.shard.name}: replay cancelled")
            self._cond.notify_all()
        for task in self.tasks:
            task.cancel()
        return ready


class ItemFeed:
    """Replays (epoch, shard) items for one teacher into finished batches, ahead of it.

    Args:
        cfg: a ``teacher.job.CacheJobConfig`` (plan, views, batch_size, ``replay``, ``num_workers``).
        manifest: the loaded manifest of ``cfg.shards``.
        out_size: the teacher's input size.
        pin: stage batches in pinned memory (a CUDA teacher: ``teacher.device.pin_memory``).
        pool: the replay workers (default ``pool.make_pool(cfg.replay, cfg.num_workers)``,
            closed with the feed).
        read: ``read(manifest, shard) -> [RawSample]`` (default ``shards.read_shard``, any URL);
            raises ShardError naming the shard.
    """

    def __init__(self, cfg, manifest, out_size: int, *, pin: bool = False, pool=None,
                 read: Callable = read_shard):
        self.cfg, self.manifest, self.out_size, self.read = cfg, manifest, out_size, read
        self.pool = pool if pool is not None else make_pool(cfg.replay, cfg.num_workers)
        self._slots = threading.Semaphore(self.pool.depth) if self.pool.depth else None
        self._buffers = _Buffers(2 * AHEAD + 1, pin)  # two items' worth ahead + the one being scored
        self._items: dict[tuple[int, int], _Item] = {}
        self._to_read: queue.Queue = queue.Queue()
        self._to_batch: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._feed, name="replay-feeder", daemon=True),
                         threading.Thread(target=self._batch, name="replay-batcher", daemon=True)]
        for t in self._threads:
            t.start()

    def start(self, epoch: int, shard_index: int) -> None:
        """Begin replaying an item in the background (after the items started before it)."""
        key = (epoch, shard_index)
        if key not in self._items:
            self._items[key] = item = _Item(epoch, self.manifest.shards[shard_index])
            self._to_read.put(item)
            self._to_batch.put(item)

    def keep(self, *keys) -> None:
        """Drop started items other than ``keys`` (a prefetch the job did not ask for after all)."""
        for key in [k for k in self._items if k not in keys]:
            for batch in self._items.pop(key).cancel():
                self._buffers.give(batch.buffer)

    def batches(self, epoch: int, shard_index: int, skipped: list, pids: set) -> Iterator[Batch]:
        """The item's teacher batches in its fixed order; give each back with :meth:`release`.

        At the end, ``skipped`` holds the skip records of corrupt samples (their rows and the
        rows mixing them in) and ``pids`` the worker processes that replayed the item.
        Raises ShardError naming the shard for a missing or truncated tar.
        """
        self.start(epoch, shard_index)
        item = self._items[epoch, shard_index]
        x = None
        try:
            while (x := item.take()) is not _END:
                if isinstance(x, BaseException):
                    raise x
                yield x
            skipped.extend(item.skipped)
            pids.update(item.pids)
        finally:
            if isinstance(x, Batch) and not x.released:  # the teacher failed on it: reuse the buffer
                self.release(x)
            if self._items.get((epoch, shard_index)) is item:
                for batch in self._items.pop((epoch, shard_index)).cancel():
                    self._buffers.give(batch.buffer)

    def release(self, batch: Batch) -> None:
        """The teacher is done with ``batch`` (on CUDA: its copy to the device has completed)."""
        if not batch.released:
            batch.released = True
            self._buffers.give(batch.buffer)

    def close(self) -> None:
        """Stop the threads and the workers."""
        self.keep()
        self._stop.set()
        self._to_read.put(None)
        self._to_batch.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self.pool.close()

    # ----------------------------------------------------------------------- threads

    def _feed(self) -> None:
        while (item := self._to_read.get()) is not None:
            if item.cancelled:
                continue
            try:
                samples = self.read(self.manifest, item.shard)
                by_id = {s.sample_id: s for s in samples}
                groups = item.plan(samples, self.cfg)
            except BaseException as exn:  # ShardError, or a bug: raised where the batches are read
                item.fail(exn)
                continue
            try:
                for group in groups:
                    if item.cancelled or self._stop.is_set():
                        break
                    self._submit(item, [by_id[s] for s in group])
            except BaseException as exn:  # e.g. BrokenProcessPool: a worker died
                item.fail(exn)

    def _submit(self, item: _Item, samples: list) -> None:
        if self._slots is not None:
            self._slots.acquire()
        try:
            task = self.pool.submit(premix, samples, self.cfg.aug, self.cfg.seed, item.epoch, self.cfg.views,
                                    self.out_size)
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise
        if self._slots is not None:
            task.add_done_callback(lambda _t: self._slots.release())
        item.add_task(task)

    def _batch(self) -> None:
        while (item := self._to_batch.get()) is not None:
            if item.cancelled:
                continue
            try:
                self._batch_item(item)
                item.offer(_END)
            except BaseException as exn:  # handed to the reader of the item
                item.offer(exn)

    def _batch_item(self, item: _Item) -> None:
        samples = item.wait_samples()
        size, cfg = self.cfg.batch_size, self.cfg
        buf, ids, views = None, [], []
        try:
            for view in range(cfg.views):
                request = ReplayRequest(cfg.aug, cfg.seed, item.epoch, view, self.out_size, self.manifest.num_classes)
                for row in replay_items(request, samples, item.shard, item.pairs[view], skipped=item.skipped,
                                        premixed=partial(self._finished, item, view)):
                    if buf is None:
                        buf = self._buffers.take((size, *row.image.shape), self._stop)
                        if buf is None:
                            return
                    buf[len(ids)].copy_(row.image)
                    ids.append(row.sample_id)
                    views.append(view)
                    if len(ids) == size:
                        handed, buf, ids, views = self._hand_over(item, buf, ids, views), None, [], []
                        if not handed:
                            return
            if ids:
                self._hand_over(item, buf, ids, views)
                buf = None
        finally:
            if buf is not None:  # cancelled or failed mid-batch: the buffer goes back
                self._buffers.give(buf)

    def _hand_over(self, item: _Item, buf: torch.Tensor, ids: list, views: list) -> bool:
        """Queue a full buffer as the item's next batch (or give it back if the item was dropped)."""
        batch = Batch(buf[:len(ids)], np.array(ids, dtype=np.int64), np.array(views, dtype=np.int64), buf)
        if not item.offer(batch):
            self._buffers.give(buf)
            return False
        return True

    def _finished(self, item: _Item, view: int, sid: int):
        p = item.premix_of(sid)
        if p.error is not None:
            return SampleError(p.error, shard=item.shard.name)
        pixels, p.pixels[view] = p.pixels[view], None  # each view's image is finished once
        return p.params[view], finish(pixels, p.params[view], self.cfg.aug)
