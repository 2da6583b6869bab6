"""Batches of replayed rows for one rank: read shards, replay units interleaved, shuffle, batch.

A rank's rows come as :class:`pipeline.schedule.Unit` s (a slice of one shard's mix pairs for
one cache epoch and view). Each DataLoader worker gets whole units (``schedule.deal_to_workers``)
and runs the stages::

    units -> open (read the shard's tar: ``shards.read_shard``, any URL; ShardError names the shard)
          -> interleave (``interleave`` shards replayed at once, each with all the views and
             parts this worker owns; items drawn at random in proportion to what is left)
          -> shuffle (buffer of ``shuffle_buffer`` items spanning those units)
          -> chunks (about batch_size / num_workers items, plus ("skip", record) markers)

and the main process concatenates chunks from all workers (round robin, in order) into batches
of exactly ``batch_size``. So even class-sorted shards give class-mixed batches: a batch draws on
``num_workers x interleave`` shards at once. Every random choice is keyed on ``order_seed`` and
the worker id; the pixels of a row depend on nothing here (``pipeline.replay``).

Corrupt samples are never dropped silently: their records land in ``loader.skipped`` (and
``on_skip``) with shard, key, sample_id, epoch, view and reason.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from pipeline.plan import AugConfig
from pipeline.replay import ReplayItem, collate, replay_items
from pipeline.schedule import Schedule, Unit, deal_to_workers
from pipeline.shards import Manifest, read_shard


@dataclass(frozen=True)
class LoaderConfig:
    """How a rank reads and batches its units (values only; nothing here changes pixels).

    Args:
        batch_size: rows per batch on this rank (the last batch may be short unless drop_last).
        out_size: replay resolution.
        num_workers: DataLoader processes (0 = in this process).
        interleave: shards each worker replays at once.
        shuffle_buffer: items in each worker's shuffle buffer (<= 1: no shuffle).
        decode_cache: decoded images a worker keeps, so views of one shard replayed close
            together decode each image once.
        extra_size: also render every row at this size (``batch["extra_image"]``).
        max_batches: stop after this many batches (lock-step DDP: the schedule's step count).
        drop_last: drop a final short batch.
    """

    batch_size: int
    out_size: int
    num_workers: int = 0
    interleave: int = 4
    shuffle_buffer: int = 512
    decode_cache: int = 256
    extra_size: int | None = None
    max_batches: int | None = None
    drop_last: bool = False

    def __post_init__(self):
        for name in ("batch_size", "out_size", "interleave"):
            if getattr(self, name) < 1:
                raise ValueError(f"loader {name} must be >= 1, found {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"loader num_workers must be >= 0, found {self.num_workers}")


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


# --------------------------------------------------------------------------- worker stages


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def interleave(streams: Sequence[Callable[[], Iterator]], sizes: Sequence[int], width: int,
               rng: random.Random) -> Iterator:
    """Run ``width`` streams at once; draw the next item from one picked in proportion to its
    remaining size (so they finish together), opening the next stream when one ends."""
    pending = list(zip(streams, sizes))[::-1]
    active: list[list] = []   # [iterator, remaining]
    while pending or active:
        while pending and len(active) < width:
            make, size = pending.pop()
            active.append([make(), max(size, 1)])
        pick = rng.random() * sum(a[1] for a in active)
        i = 0
        while i < len(active) - 1 and pick >= active[i][1]:
            pick -= active[i][1]
            i += 1
        item = next(active[i][0], None)
        if item is None:
            active.pop(i)
            continue
        active[i][1] = max(active[i][1] - 1, 1)
        yield item


def shuffle_items(src: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle buffer over items; skip records (dicts) pass straight through."""
    if bufsize <= 1:
        yield from src
        return
    buf: list = []
    for x in src:
        if isinstance(x, dict):
            yield x
            continue
        if len(buf) < bufsize:
            buf.append(x)
            continue
        j = rng.randrange(len(buf))
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


def chunk_items(src: Iterator, size: int) -> Iterator[tuple[str, dict]]:
    """Items -> ("batch", collated chunk of up to ``size``); skip records -> ("skip", record)."""
    items: list[ReplayItem] = []
    for x in src:
        if isinstance(x, dict):
            yield ("skip", x)
            continue
        items.append(x)
        if len(items) == size:
            yield ("batch", collate(items))
            items = []
    if items:
        yield ("batch", collate(items))


class _Units(torch.utils.data.IterableDataset):
    """The per-worker pipeline over this rank's units."""

    def __init__(self, manifest: Manifest, aug: AugConfig, seed: int, units: Sequence[Unit],
                 cfg: LoaderConfig, order_seed: tuple):
        self.manifest, self.aug, self.seed, self.units = manifest, aug, seed, list(units)
        self.cfg, self.order_seed = cfg, order_seed

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        cfg, worker = self.cfg, _worker_id()
        mine = deal_to_workers(self.units, max(1, cfg.num_workers))[worker]
        rng = random.Random(str((*self.order_seed, worker)))
        shards: _LRU = _LRU(cfg.interleave)
        decoded: _LRU = _LRU(cfg.decode_cache)
        records: list[dict] = []

        def stream(unit: Unit) -> Callable[[], Iterator]:
            def run() -> Iterator:
                shard = self.manifest.shards[unit.shard]
                if unit.shard not in shards:
                    shards[unit.shard] = read_shard(self.manifest, shard)
                items = replay_items(shards[unit.shard], shard, self.aug, self.seed, unit.epoch, unit.view,
                                     cfg.out_size, self.manifest.num_classes, unit.pairs(self.seed, shard),
                                     skipped=records.append, decoded=decoded, extra_size=cfg.extra_size)
                for item in items:
                    while records:
                        yield records.pop(0)
                    yield item
                while records:
                    yield records.pop(0)
            return run

        # one stream per shard (its views/parts interleaved, sharing the read and the decodes),
        # ``interleave`` shards at a time
        groups: dict[int, list[Unit]] = {}
        for u in mine:
            groups.setdefault(u.shard, []).append(u)

        def shard_stream(units: list[Unit]) -> Callable[[], Iterator]:
            return lambda: interleave([stream(u) for u in units], [u.rows for u in units], len(units), rng)

        items = interleave([shard_stream(g) for g in groups.values()],
                           [sum(u.rows for u in g) for g in groups.values()], cfg.interleave, rng)
        items = shuffle_items(items, cfg.shuffle_buffer, rng)
        chunk = max(1, math.ceil(cfg.batch_size / max(1, cfg.num_workers)))
        yield from chunk_items(items, chunk)


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode/augment in parallel; no thread oversubscription


def _cat(batches: list[dict]) -> dict:
    return batches[0] if len(batches) == 1 else {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class ReplayLoader:
    """Iterable of replayed batches for one rank's units of one epoch.

    Args:
        manifest: the split's manifest.
        aug, seed: the plan.
        units: this rank's units (``Schedule.rank_units``), in reading order.
        cfg: :class:`LoaderConfig`.
        order_seed: integers keying the interleave and shuffle choices (with the worker id).
        on_skip: callback per skip record; records also collect in ``skipped``.

    Yields ``{"image" [B,3,H,W], "target" [B,C], "label" [B], "sample_id" [B], "epoch" [B],
    "view" [B]}`` (+ ``"extra_image"`` with ``cfg.extra_size``).
    """

    def __init__(self, manifest: Manifest, aug: AugConfig, seed: int, units: Sequence[Unit],
                 cfg: LoaderConfig, order_seed: tuple = (0,), on_skip: Callable[[dict], None] | None = None):
        self.manifest, self.aug, self.seed, self.units = manifest, aug, seed, list(units)
        self.cfg, self.order_seed, self.on_skip = cfg, tuple(order_seed), on_skip
        self.skipped: list[dict] = []

    def __len__(self) -> int:
        rows = sum(u.rows for u in self.units)
        n = rows // self.cfg.batch_size if self.cfg.drop_last else math.ceil(rows / self.cfg.batch_size)
        return n if self.cfg.max_batches is None else min(n, self.cfg.max_batches)

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        cfg = self.cfg
        workers = min(cfg.num_workers, len(self.units))
        dataset = _Units(self.manifest, self.aug, self.seed, self.units,
                         dataclasses.replace(cfg, num_workers=workers), self.order_seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers,
            worker_init_fn=_init_worker if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None)
        limit = math.inf if cfg.max_batches is None else cfg.max_batches
        emitted, pending, n = 0, [], 0
        it = iter(loader)
        try:
            for kind, payload in it:
                if kind == "skip":
                    self.skipped.append(payload)
                    if self.on_skip is not None:
                        self.on_skip(payload)
                    continue
                pending.append(payload)
                n += len(payload["label"])
                while n >= cfg.batch_size and emitted < limit:
                    cat = _cat(pending)
                    yield {k: v[: cfg.batch_size] for k, v in cat.items()}
                    emitted += 1
                    n -= cfg.batch_size
                    pending = [{k: v[cfg.batch_size:] for k, v in cat.items()}] if n else []
                if emitted >= limit:
                    return
            if n and not cfg.drop_last and emitted < limit:
                yield _cat(pending)
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
    return ReplayLoader(manifest, aug, seed, schedule.rank_units(0, rank, world_size), cfg,
                        order_seed=(seed, rank), on_skip=on_skip)
