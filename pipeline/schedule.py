"""The student epoch: which cached rows it reads, in which order, on which rank.

A cache epoch holds every (sample, view) row, N x V of them. A student epoch is one pass over
the dataset's N images, as in DeiT and timm, so V student epochs consume one cache epoch, and
over a run every cached row is read once before any is read again.

**The cut.** In cache epoch ``e`` each shard's ``count x V`` rows are listed sample-major (its
samples in a seeded order, each with views 0..V-1) and cut into V *parts* of exactly ``count``
rows; part ``j`` of every shard together is what one student epoch reads, so a student epoch
holds exactly N rows from every shard: every class of even a class-sorted dataset, every epoch.
A part holds about count/V samples with all their views (a sample at a part boundary has some
views in each). Mixup/CutMix partners are paired within a part (``plan.mix_pairs(members=...,
group=part)``), so a student epoch can build every mixed image from the rows it reads. The cut
belongs to the cache (the caching job pairs by it); every student of the cache replays the
same pairs, whatever its sampler. With V = 1 a part is the whole shard.

**Samplers.**

* ``"ra"`` (default, DeiT's RASampler): student epoch ``t`` reads part ``t % V`` of cache epoch
  ``(t // V) % E``: about N/V distinct samples x V views. Units are listed view-major, so under
  DDP the views of a sample land on different ranks, as with RASampler.
* ``"one_view"``: student epoch ``t`` reads view ``t % V`` of every sample of cache epoch
  ``(t // V) % E``.

**Ranks and workers.** The epoch's *units* (cache epoch, shard, view, part, slice of its pair
list) are listed in a per-student-epoch seeded shard order, view-major, and cut into W
contiguous blocks of R/W rows (±1), splitting a unit's pair list where a block ends: each rank
reads exactly its share and every row is read by exactly one rank. Within a rank, all units of
one shard go to the same DataLoader worker (one read of the tar, one decode per sample for all
its views there), shards dealt least-loaded first.

Everything here is a pure function of integers (seed, epochs, views, shard counts, ranks);
no global RNG, nothing read from disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from pipeline.plan import mix_pairs

SAMPLERS = ("ra", "one_view")
_CUT_TAG = 0x6B645F63     # "kd_c": in-shard sample order of the cut
_ORDER_TAG = 0x6B645F6F   # "kd_o": a student epoch's reading order


def _rng(tag: int, *ints: int) -> np.random.Generator:
    key = np.random.SeedSequence((tag, *[int(i) for i in ints])).generate_state(2, np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


@dataclass(frozen=True)
class EpochCut:
    """The cut of one cache epoch: every shard's rows in ``views`` parts of ``count`` rows each."""

    seed: int
    epoch: int
    views: int

    def sample_order(self, shard) -> np.ndarray:
        """The shard's sample offsets in the cut's seeded order."""
        return _sample_order(self.seed, self.epoch, int(shard.index), int(shard.count))

    def members(self, shard, part: int, view: int) -> tuple[int, ...] | None:
        """Sample ids of ``shard`` whose ``view`` row lies in ``part``; None = the whole shard (V = 1)."""
        if self.views == 1:
            return None
        first, stop = _positions(int(shard.count), self.views, part, view)
        offsets = self.sample_order(shard)[first:stop]
        return tuple(sorted((int(shard.first_id) + offsets).tolist()))


def _positions(count: int, views: int, part: int, view: int) -> tuple[int, int]:
    """[first, stop) of the sample positions whose row ``p * views + view`` is in part ``part``."""
    lo, hi = part * count, (part + 1) * count
    first, stop = -(-(lo - view) // views), -(-(hi - view) // views)   # ceil
    return max(first, 0), max(stop, 0)


def part_rows(count: int, views: int, part: int, view: int) -> int:
    """How many rows of ``view`` a shard of ``count`` samples has in ``part`` (no RNG needed)."""
    first, stop = _positions(count, views, part, view)
    return stop - first


@lru_cache(maxsize=4096)
def _sample_order(seed: int, epoch: int, index: int, count: int) -> np.ndarray:
    order = _rng(_CUT_TAG, seed, epoch, index).permutation(count)
    order.setflags(write=False)
    return order


def epoch_cut(seed: int, epoch: int, views: int) -> EpochCut:
    """The cut of cache epoch ``epoch`` (see the module docstring)."""
    if views < 1:
        raise ValueError(f"epoch_cut: views must be >= 1, found {views}")
    return EpochCut(int(seed), int(epoch), int(views))


def shard_pairs(cut: EpochCut, view: int, shard) -> list[tuple[int, int]]:
    """Every (sample_id, partner_id) of one shard and view, part by part (the caching job's rows)."""
    pairs: list[tuple[int, int]] = []
    for part in range(cut.views):
        members = cut.members(shard, part, view)
        if members is None or members:
            pairs += mix_pairs(cut.seed, cut.epoch, view, shard, members, part)
    return pairs


# --------------------------------------------------------------------------- student epochs


@dataclass(frozen=True)
class Unit:
    """Rows one reader replays: a slice of the pairs of one (cache epoch, shard, view, part).

    The rows are the first elements of ``pairs(...)``: the part's members paired by
    ``plan.mix_pairs(seed, epoch, view, shard, members, part)``, sliced ``[start:stop]``.
    """

    epoch: int
    shard: int
    view: int
    part: int
    views: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def pairs(self, seed: int, shard) -> list[tuple[int, int]]:
        members = epoch_cut(seed, self.epoch, self.views).members(shard, self.part, self.view)
        return mix_pairs(seed, self.epoch, self.view, shard, members, self.part)[self.start:self.stop]


@dataclass(frozen=True)
class EpochSource:
    """What student epoch ``epoch`` reads: cache epoch ``cache_epoch``, part (ra) or view (one_view)."""

    epoch: int
    cache_epoch: int
    part: int | None
    view: int | None
    cycle: int                  # 0 on the first pass over the cache, 1 on the second, ...

    def describe(self) -> str:
        what = f"part {self.part} (all views)" if self.part is not None else f"view {self.view}"
        return f"cache epoch {self.cache_epoch} {what}" + (f", cycle {self.cycle}" if self.cycle else "")


class Schedule:
    """Student epochs over a cache of ``cached_epochs`` x ``views``; see the module docstring.

    Args:
        shards: the manifest's ShardInfo list (``index``, ``first_id``, ``count``).
        views: views per sample in the cache (V).
        cached_epochs: cache epochs (E); student epochs cycle after E·V of them.
        seed: the plan seed (the cut is keyed on it).
        sampler: ``"ra"`` or ``"one_view"``.
        order_seed: seed of the per-student-epoch reading order (default: ``seed``).
    """

    def __init__(self, shards: Sequence, views: int, cached_epochs: int, seed: int,
                 sampler: str = "ra", order_seed: int | None = None):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, found {sampler!r}")
        if views < 1 or cached_epochs < 1:
            raise ValueError(f"schedule: views and cached_epochs must be >= 1, found {views}, {cached_epochs}")
        self.shards = list(shards)
        self.counts = tuple(int(s.count) for s in self.shards)
        self.num_samples = sum(self.counts)
        self.views, self.cached_epochs, self.seed = views, cached_epochs, seed
        self.sampler = sampler
        self.order_seed = seed if order_seed is None else order_seed

    def source(self, epoch: int) -> EpochSource:
        """Which cache epoch (and part or view) student epoch ``epoch`` reads."""
        if epoch < 0:
            raise ValueError(f"student epoch must be >= 0, found {epoch}")
        per_cycle = self.views * self.cached_epochs
        e, slot = (epoch % per_cycle) // self.views, epoch % self.views
        if self.sampler == "ra":
            return EpochSource(epoch, e, slot, None, epoch // per_cycle)
        return EpochSource(epoch, e, None, slot, epoch // per_cycle)

    def cut(self, cache_epoch: int) -> EpochCut:
        return epoch_cut(self.seed, cache_epoch, self.views)

    def units(self, epoch: int) -> list[Unit]:
        """All units of student epoch ``epoch`` in reading order (before the rank split)."""
        src = self.source(epoch)
        order = _rng(_ORDER_TAG, self.order_seed, epoch).permutation(len(self.shards)).tolist()
        views = range(self.views) if src.part is not None else [src.view]
        parts = [src.part] if src.part is not None else range(self.views)
        units = []
        for view in views:  # view-major: the views of one sample go to different ranks
            for s in order:
                for part in parts:
                    rows = part_rows(self.counts[s], self.views, part, view)
                    if rows:
                        units.append(Unit(src.cache_epoch, s, view, part, self.views, 0, rows))
        return units

    def rows(self, epoch: int) -> int:
        """Rows student epoch ``epoch`` reads: N in either sampler (a part holds ``count`` rows of
        every shard; a view holds one row per sample)."""
        self.source(epoch)
        return self.num_samples

    def rank_units(self, epoch: int, rank: int, world_size: int) -> list[Unit]:
        """The units rank ``rank`` of ``world_size`` reads: a contiguous block of R/W rows."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        units = self.units(epoch)
        total = sum(u.rows for u in units)
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        out, offset = [], 0
        for u in units:
            a, b = max(lo, offset), min(hi, offset + u.rows)
            if a < b:
                out.append(Unit(u.epoch, u.shard, u.view, u.part, u.views, u.start + a - offset, u.start + b - offset))
            offset += u.rows
            if offset >= hi:
                break
        return out

    def rank_rows(self, epoch: int, world_size: int) -> list[int]:
        total = self.rows(epoch)
        return [(r + 1) * total // world_size - r * total // world_size for r in range(world_size)]

    def steps(self, epoch: int, batch_size: int, world_size: int = 1) -> int:
        """Lock-step batches per rank: every rank has a batch (the last one may be short)."""
        return min(-(-n // batch_size) for n in self.rank_rows(epoch, world_size))

    def needed_items(self, epoch: int) -> list[tuple[int, int]]:
        """(cache epoch, shard) items student epoch ``epoch`` reads: every shard of its cache epoch."""
        e = self.source(epoch).cache_epoch
        return [(e, s.index) for s in self.shards]


def deal_to_workers(units: Sequence[Unit], num_workers: int) -> list[list[Unit]]:
    """Units to ``num_workers`` lists: all units of a shard to one worker (read and decoded once
    there), shards in order of first appearance, each to the least-loaded worker (ties: lowest id)."""
    by_shard: dict[int, list[Unit]] = {}
    for u in units:
        by_shard.setdefault(u.shard, []).append(u)
    lists: list[list[Unit]] = [[] for _ in range(max(1, num_workers))]
    load = [0] * len(lists)
    for group in by_shard.values():
        w = min(range(len(lists)), key=lambda i: (load[i], i))
        lists[w] += group
        load[w] += sum(u.rows for u in group)
    return lists
