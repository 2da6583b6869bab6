"""Batches of replayed rows for one rank: one optimizer step per batch, read by lanes.

:meth:`pipeline.schedule.Schedule.order` says which rows a rank trains on in each step of an
epoch, and which *lane* reads the step (step ``s``: lane ``s % lanes``). Each DataLoader worker
is one lane and runs::

    its steps -> rows (shard, sample_id, view, part; the partner from ``plan.mix_pairs``)
              -> open (the lane's window of shards: ``shards.read_shard``, any URL; ShardError
                 names the shard)
              -> replay (``replay.replay_row``: decode, augment, mix; decodes cached per worker)
              -> one collated batch per step, with the skip records of its rows

and the main process takes the workers' batches in DataLoader order (round robin over workers),
which is the step order. Nothing is replayed ahead of its step: the reading order is computed
from integers, so the first batch waits for one step's replays only. Pixels of a row depend on
nothing here (``pipeline.replay``).

Corrupt samples are never dropped silently: their records land in ``loader.skipped`` (and
``on_skip``) with shard, key, sample_id, epoch, view and reason.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from pipeline.plan import AugConfig, mix_pairs
from pipeline.replay import ReplayRequest, collate, replay_row
from pipeline.schedule import RankOrder, Schedule, epoch_cut
from pipeline.manifest import Manifest
from pipeline.shards import read_shard


@dataclass(frozen=True)
class LoaderConfig:
    """How a rank replays its steps (values only; nothing here changes pixels or the order).

    Args:
        batch_size: rows per step on this rank (``Schedule.order`` makes the steps).
        out_size: replay resolution.
        num_workers: DataLoader processes (0 = in this process); one lane each.
        interleave: shards a lane holds open (its window).
        decode_cache: decoded images a worker keeps, so the views of a sample on this rank and
            its use as a mix partner decode it once.
        extra_size: also render every row at this size (``batch["extra_image"]``).
        max_batches: stop after this many batches.
    """

    batch_size: int
    out_size: int
    num_workers: int = 0
    interleave: int = 4
    decode_cache: int = 256
    extra_size: int | None = None
    max_batches: int | None = None

    def __post_init__(self):
        for name in ("batch_size", "out_size", "interleave"):
            if getattr(self, name) < 1:
                raise ValueError(f"loader {name} must be >= 1, found {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"loader num_workers must be >= 0, found {self.num_workers}")

    @property
    def lanes(self) -> int:
        return max(1, self.num_workers)


class _LRU(OrderedDict):
    """A dict that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class _Lane(torch.utils.data.IterableDataset):
    """The per-worker pipeline: this worker's lane of the rank's steps."""

    def __init__(self, manifest: Manifest, aug: AugConfig, seed: int, order: RankOrder, cfg: LoaderConfig):
        self.manifest, self.aug, self.seed, self.order, self.cfg = manifest, aug, seed, order, cfg

    def __iter__(self) -> Iterator[tuple[dict | None, list[dict]]]:
        cfg, rows, seed = self.cfg, self.order.rows, self.seed
        shards: _LRU = _LRU(cfg.interleave + 1)   # the window, plus a shard shared with the next lane
        pairs: _LRU = _LRU(4 * (cfg.interleave + 1) * 8)
        decoded: _LRU = _LRU(cfg.decode_cache)

        def samples_of(s: int) -> dict:
            if s not in shards:
                samples = read_shard(self.manifest, self.manifest.shards[s])
                shards[s] = {x.sample_id: x for x in samples}
            return shards[s]

        def partner(s: int, a: int, view: int, part: int) -> int:
            key = (s, view, part)
            if key not in pairs:
                shard = self.manifest.shards[s]
                members = epoch_cut(seed, rows.epoch, self.order.views).members(shard, part, view)
                pairs[key] = dict(mix_pairs(seed, rows.epoch, view, shard, members, part))
            return pairs[key][a]

        for _step, ix in self.order.lane_steps(_worker_id()):
            items, records = [], []
            for i in ix.tolist():
                s, a, view, part = int(rows.shard[i]), int(rows.sample[i]), int(rows.view[i]), int(rows.part[i])
                request = ReplayRequest(self.aug, seed, rows.epoch, view, cfg.out_size, self.manifest.num_classes,
                                        cfg.extra_size)
                item = replay_row(request, samples_of(s), self.manifest.shards[s], a, partner(s, a, view, part),
                                  decoded)
                (records if isinstance(item, dict) else items).append(item)
            yield (collate(items) if items else None), records


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode/augment in parallel; no thread oversubscription


class ReplayLoader:
    """Iterable of replayed batches for one rank's steps of one epoch.

    Args:
        manifest: the split's manifest.
        aug, seed: the plan.
        order: this rank's steps (``Schedule.order``, made with ``lanes=cfg.lanes``).
        cfg: :class:`LoaderConfig`.
        on_skip: callback per skip record; records also collect in ``skipped``.

    Yields ``{"image" [B,3,H,W], "target" [B,C], "label" [B], "sample_id" [B], "epoch" [B],
    "view" [B]}`` (+ ``"extra_image"`` with ``cfg.extra_size``), one per step (a step whose rows
    were all corrupt yields nothing).
    """

    def __init__(self, manifest: Manifest, aug: AugConfig, seed: int, order: RankOrder,
                 cfg: LoaderConfig, on_skip: Callable[[dict], None] | None = None):
        if order.lanes != cfg.lanes:
            raise ValueError(f"loader: the order was laid out for {order.lanes} lanes, "
                             f"num_workers={cfg.num_workers} reads {cfg.lanes}")
        self.manifest, self.aug, self.seed, self.order = manifest, aug, seed, order
        self.cfg, self.on_skip = cfg, on_skip
        self.skipped: list[dict] = []

    def __len__(self) -> int:
        n = len(self.order.steps)
        return n if self.cfg.max_batches is None else min(n, self.cfg.max_batches)

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        cfg = self.cfg
        workers = cfg.num_workers
        loader = torch.utils.data.DataLoader(
            _Lane(self.manifest, self.aug, self.seed, self.order, cfg), batch_size=None,
            num_workers=workers, worker_init_fn=_init_worker if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None)
        limit = len(self)
        it = iter(loader)
        try:
            for step, (batch, records) in enumerate(it):
                if step >= limit:
                    return
                for record in records:
                    self.skipped.append(record)
                    if self.on_skip is not None:
                        self.on_skip(record)
                if batch is not None:
                    yield batch
        finally:
            # Stop workers now (max_batches cut the epoch short, or an error): left to the
            # garbage collector, a DataLoader iterator that saw an error takes ~5 s to shut down.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def split_loader(manifest: Manifest, aug: AugConfig, cfg: LoaderConfig, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, on_skip: Callable[[dict], None] | None = None) -> ReplayLoader:
    """Every sample of a split once (view 0 of plan epoch 0), this rank's share: eval and audits."""
    schedule = Schedule(manifest.shards, views=1, cached_epochs=1, seed=seed, sampler="one_view")
    order = schedule.order(0, rank, world_size, cfg.batch_size, lanes=cfg.lanes, interleave=cfg.interleave)
    return ReplayLoader(manifest, aug, seed, order, cfg, on_skip=on_skip)
