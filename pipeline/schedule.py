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

* ``"ra"`` (default, DeiT's repeated augmentation): student epoch ``t`` reads part ``t % V`` of
  cache epoch ``(t // V) % E``: about N/V distinct samples x V views, **the views of a sample in
  the same optimizer step**. As DeiT's RASampler deals the view-repeated index list
  ``indices[rank::world]``, each global step of ``world x batch`` rows holds whole groups (one
  sample's views, consecutive) and rank ``r`` takes ``rows[r::world]`` of it: the views sit on
  neighbouring ranks at the same batch position, in one batch on one process. Only a group cut
  by a step boundary (as in RASampler, when ``world x batch`` is not a multiple of V) or a
  sample at a part boundary (its other views are in the next student epoch, <= V-1 per shard
  and cache epoch) has its views in different steps.
* ``"one_view"``: student epoch ``t`` reads view ``t % V`` of every sample of cache epoch
  ``(t // V) % E``; each rank reads an exact contiguous block of the epoch (its shards only).

**Steps, lanes and windows** (:meth:`Schedule.order`). The epoch's rows (shards in a seeded
order) are laid out in steps; step ``s`` is read by *lane* ``s % lanes`` (a lane is one
DataLoader worker, so the loader's round robin over workers is the step order). A lane owns a
contiguous run of shards (the rows its steps hold) and shuffles their groups inside windows of
``interleave`` shards: a worker holds a window's shards open, and every step mixes the classes
of ``interleave`` shards. With ``ra`` every rank reads every shard of the epoch (it decodes only
the rows it trains on), as DeiT reads each view on its own rank; ``one_view`` reads each shard
once per epoch across ranks. All of it is computed from integers before any image is read: no
buffer of replayed images, no wait before the first step.

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
_LANE_TAG = 0x6B645F6C    # "kd_l": a lane's shuffle of its windows


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

    def _shard_order(self, epoch: int) -> list[int]:
        return _rng(_ORDER_TAG, self.order_seed, epoch).permutation(len(self.shards)).tolist()

    def units(self, epoch: int) -> list[Unit]:
        """What student epoch ``epoch`` reads, as units (one per shard, view and part), shards in
        the epoch's seeded order: the content of the epoch, not its step order (see :meth:`order`)."""
        src = self.source(epoch)
        views = range(self.views) if src.part is not None else [src.view]
        parts = [src.part] if src.part is not None else range(self.views)
        units = []
        for s in self._shard_order(epoch):
            for view in views:
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

    def epoch_rows(self, epoch: int) -> Rows:
        """Every row of student epoch ``epoch``, shards in the epoch's seeded order and, inside a
        shard, groups (one sample's rows, its views consecutive) in the cut's sample order."""
        src = self.source(epoch)
        cut = epoch_cut(self.seed, src.cache_epoch, self.views)
        V = self.views
        out = []
        for s in self._shard_order(epoch):
            shard, count = self.shards[s], self.counts[s]
            order = cut.sample_order(shard)
            if src.part is not None:   # ra: the part's rows, sample-major (position p, view v) = p*V + v
                i = np.arange(src.part * count, (src.part + 1) * count)
                pos, view = i // V, i % V
                part = np.full(count, src.part)
            else:                      # one_view: view v of every sample, in the part that holds it
                pos, view = np.arange(count), np.full(count, src.view)
                part = (pos * V + src.view) // count
            sample = int(shard.first_id) + order[pos]
            out.append(np.stack([np.full(count, s), sample, view, part]))
        cols = np.concatenate(out, axis=1) if out else np.zeros((4, 0), np.int64)
        return Rows(src.cache_epoch, *(c.astype(np.int64) for c in cols))

    def step_sizes(self, epoch: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> list[int]:
        """Rows of each optimizer step of student epoch ``epoch``, summed over the ranks.

        ``ra``: steps of ``world_size x batch_size`` rows, dealt to ranks as RASampler deals
        (``rows[rank::world_size]`` of each step); a last step too small to give every rank a row
        joins the one before. ``one_view``: per rank (its block of the epoch), ``batch_size`` rows
        a step, as many steps on every rank (the last takes the remainder); the sizes are rank 0's.
        ``drop_last`` drops a final short step (its rows are read in no step, as DeiT drops them).
        """
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"schedule: batch_size and world_size must be >= 1, found {batch_size}, {world_size}")
        if self.sampler == "ra":
            return _sizes(self.rows(epoch), world_size * batch_size, world_size, drop_last)
        block = min(_blocks(self.rows(epoch), world_size))
        return _sizes(block, batch_size, 1, drop_last)

    def steps(self, epoch: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Lock-step batches per rank (the same on every rank)."""
        return len(self.step_sizes(epoch, batch_size, world_size, drop_last))

    def order(self, epoch: int, rank: int, world_size: int, batch_size: int, lanes: int = 1,
              interleave: int = 4, drop_last: bool = False) -> RankOrder:
        """The rows rank ``rank`` reads in student epoch ``epoch``, step by step (module docstring).

        Args:
            batch_size: rows per step on one rank.
            lanes: reading lanes (= DataLoader workers; step ``s`` is read by lane ``s % lanes``).
            interleave: shards a lane reads at once; its rows are shuffled across them.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        rows = self.epoch_rows(epoch)
        key = (self.order_seed, epoch)
        if self.sampler == "ra":   # one global order, every step dealt rows[rank::world_size]
            sizes = self.step_sizes(epoch, batch_size, world_size, drop_last)
            ordered, bounds = lay_out(rows, sizes, lanes, interleave, self.views, key)
            steps = [np.arange(a + rank, b, world_size) for a, b in bounds]
        else:                      # one_view: the rank's own block of the epoch, in its own order
            n = self.rows(epoch)
            lo, hi = rank * n // world_size, (rank + 1) * n // world_size
            block = rows.take(np.arange(lo, hi))
            sizes = _sizes(min(_blocks(n, world_size)), batch_size, 1, drop_last)
            sizes[-1] += (hi - lo) - sum(sizes) if not drop_last else 0
            ordered, bounds = lay_out(block, sizes, lanes, interleave, 1, (*key, rank))
            steps = [np.arange(a, b) for a, b in bounds]
        # keep only this rank's rows (what its loader workers receive), steps as ranges of them
        mine = np.concatenate(steps) if steps else np.arange(0)
        stops = np.cumsum([len(ix) for ix in steps])
        ranges = [np.arange(a, b) for a, b in zip(np.r_[0, stops[:-1]], stops)]
        return RankOrder(ordered.take(mine), ranges, max(1, lanes), self.views)

    def needed_items(self, epoch: int) -> list[tuple[int, int]]:
        """(cache epoch, shard) items student epoch ``epoch`` reads: every shard of its cache epoch."""
        e = self.source(epoch).cache_epoch
        return [(e, s.index) for s in self.shards]


@dataclass(frozen=True)
class Rows:
    """Cached rows of one cache epoch as parallel int64 arrays (shard index, sample_id, view, part)."""

    epoch: int
    shard: np.ndarray
    sample: np.ndarray
    view: np.ndarray
    part: np.ndarray

    def __len__(self) -> int:
        return len(self.sample)

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(self.epoch, self.shard[idx], self.sample[idx], self.view[idx], self.part[idx])


@dataclass(frozen=True)
class RankOrder:
    """One rank's rows of one student epoch: ``rows`` and, per step, the indices into them."""

    rows: Rows
    steps: list[np.ndarray]
    lanes: int
    views: int          # the cache's V (a row's partner comes from its part of the cut)

    def lane_steps(self, lane: int) -> list[tuple[int, np.ndarray]]:
        """(step, row indices) read by ``lane``: steps ``lane``, ``lane + lanes``, ..."""
        return [(s, self.steps[s]) for s in range(lane, len(self.steps), self.lanes)]

    def num_rows(self) -> int:
        return sum(len(s) for s in self.steps)


def _blocks(n: int, world_size: int) -> list[int]:
    return [(r + 1) * n // world_size - r * n // world_size for r in range(world_size)]


def _sizes(n: int, step: int, min_last: int, drop_last: bool) -> list[int]:
    """``n`` rows in steps of ``step``; a last step under ``min_last`` rows joins the one before."""
    if n < max(min_last, 1):
        raise ValueError(f"schedule: {n} rows cannot give each of {min_last} ranks a row")
    sizes = [step] * (n // step)
    rest = n - step * len(sizes)
    if rest and not drop_last:
        if rest < min_last and sizes:
            sizes[-1] += rest
        else:
            sizes.append(rest)
    if not sizes:   # fewer rows than one step, drop_last or not: one short step
        sizes = [n]
    return sizes


def lay_out(rows: Rows, sizes: Sequence[int], lanes: int, interleave: int, group_rows: int,
            key: tuple) -> tuple[Rows, list[tuple[int, int]]]:
    """Order ``rows`` (shard-ordered, groups contiguous) into steps of ``sizes`` read by ``lanes`` lanes.

    Step ``s`` belongs to lane ``s % lanes``. Each lane takes a contiguous segment of the rows
    (as many as its steps hold) and shuffles its groups (one sample's consecutive rows) within
    windows of ``interleave`` consecutive shards (:func:`_place_groups`), so a lane holds at most
    ``interleave`` shards open and a step mixes their classes.

    Returns the reordered rows and ``[start, stop)`` of every step in them.
    """
    lanes = max(1, lanes)
    steps = [list(range(k, len(sizes), lanes)) for k in range(lanes)]
    ends = [np.cumsum([sizes[s] for s in mine], dtype=np.int64) for mine in steps]
    cuts = np.cumsum([0] + [int(e[-1]) if len(e) else 0 for e in ends])
    segs = [np.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    for k in range(lanes - 1):
        segs[k], segs[k + 1] = _mend_cut(rows, segs[k], segs[k + 1], group_rows)
    out, bounds, first = [], [None] * len(sizes), 0
    for k in range(lanes):
        out.append(_place_groups(rows, segs[k], ends[k], interleave, group_rows, _rng(_LANE_TAG, *key, k)))
        for s, a, b in zip(steps[k], np.r_[0, ends[k][:-1]], ends[k]):
            bounds[s] = (first + int(a), first + int(b))
        first += len(segs[k])
    order = np.concatenate(out) if out else np.arange(0)
    return rows.take(order), bounds


def _mend_cut(rows: Rows, left: np.ndarray, right: np.ndarray, group_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """When the boundary between two lanes' segments cuts a sample's group, move the group's right
    part into the left segment and, in exchange, a small group of the same size (a sample whose
    other views are in another epoch) from the left segment into the right one: the sample's views
    stay in one lane, where they can share a step, and both segments keep their size."""
    if not len(left) or not len(right):
        return left, right
    key = lambda idx: rows.shard[idx] * (1 << 40) + rows.sample[idx]  # noqa: E731
    tail = key(left[-1])
    size = int(np.argmin(key(right) == tail)) if not (key(right) == tail).all() else len(right)
    if size == 0 or size >= group_rows:
        return left, right
    k = key(left)
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    lengths = np.diff(np.r_[starts, len(left)])
    for a, n in zip(starts[::-1].tolist(), lengths[::-1].tolist()):
        if n == size and k[a] != tail and np.count_nonzero(k == k[a]) == n:
            y = left[a:a + n]
            return np.r_[left[:a], left[a + n:], right[:size]], np.r_[y, right[size:]]
    # or the other way: the left part goes right, a small group of its size comes left
    cut = int(np.count_nonzero(k == tail))
    kr = key(right)
    starts = np.flatnonzero(np.r_[True, kr[1:] != kr[:-1]])
    lengths = np.diff(np.r_[starts, len(right)])
    for a, n in zip(starts.tolist(), lengths.tolist()):
        if n == cut and cut + size <= group_rows and kr[a] != tail and np.count_nonzero(kr == kr[a]) == n:
            x1 = left[len(left) - cut:]
            return np.r_[left[:len(left) - cut], right[a:a + n]], np.r_[x1, right[:a], right[a + n:]]
    return left, right


def _place_groups(rows: Rows, seg: np.ndarray, ends: np.ndarray, interleave: int, group_rows: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``seg``'s groups shuffled inside windows of ``interleave`` consecutive shard runs, placed so
    that step boundaries (``ends``, counted from the segment's start) cut as few groups as they can.

    Groups smaller than ``group_rows`` (a sample whose other views lie in another part of the
    cut, or a group cut by the lane's segment) fill the room left before a step boundary when a
    whole group would not fit; the rest close their window. A boundary cuts a group only when no
    small group fits the room (as in RASampler when ``world x batch`` is not a multiple of V).
    """
    if len(seg) == 0:
        return seg
    shard, sample = rows.shard[seg], rows.sample[seg]
    new_shard = np.r_[True, shard[1:] != shard[:-1]]
    window = (np.cumsum(new_shard) - 1) // max(1, interleave)
    starts = np.flatnonzero(np.r_[True, (sample[1:] != sample[:-1]) | new_shard[1:]])
    lengths = np.diff(np.r_[starts, len(seg)])
    gwin = window[starts]
    placed: list[int] = []
    pos, b = 0, 0
    for w_first, w_stop in _runs(gwin):
        groups = np.arange(w_first, w_stop)
        small = [int(g) for g in groups if lengths[g] < group_rows]
        full = groups[lengths[groups] >= group_rows][rng.permutation(int((lengths[groups] >= group_rows).sum()))]
        for g in full.tolist():
            while b < len(ends) and ends[b] <= pos:
                b += 1
            room = int(ends[b]) - pos if b < len(ends) else 0
            if 0 < room < lengths[g] and small:
                for f in _fill(small, lengths, room, group_rows):
                    small.remove(f)
                    placed.append(f)
                    pos += int(lengths[f])
            placed.append(g)
            pos += int(lengths[g])
        for f in small:
            placed.append(f)
            pos += int(lengths[f])
    placed_arr = np.asarray(placed, dtype=np.int64)
    rows_idx = np.repeat(starts[placed_arr] - np.r_[0, np.cumsum(lengths[placed_arr])[:-1]], lengths[placed_arr])
    return seg[rows_idx + np.arange(len(seg))]


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of the runs of equal consecutive values."""
    cuts = np.r_[0, np.flatnonzero(np.diff(values)) + 1, len(values)]
    return list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))


def _fill(small: list[int], lengths: np.ndarray, room: int, group_rows: int) -> list[int]:
    """Small groups that fill ``room`` rows, or ``room`` plus whole groups' worth (a small group cut
    by the boundary loses nothing: its sample's other views are in another epoch anyway), so the
    next whole group starts on a step boundary. The fewest rows that do; none if no subset does."""
    reach: dict[int, list[int]] = {0: []}
    limit = room + 2 * group_rows
    for g in small:
        for total, chosen in list(reach.items()):
            t = total + int(lengths[g])
            if t <= limit and t not in reach:
                reach[t] = chosen + [g]
    fits = [t for t in reach if t >= room and (t - room) % group_rows == 0]
    return reach[min(fits)] if fits else []
