"""The student schedule: one student epoch = N rows; every cached row read once per pass over the
cache; partners inside the epoch; exact rank blocks; RASampler-style views on different ranks."""
from __future__ import annotations

import time
from collections import Counter

import pytest

from pipeline.schedule import Schedule, deal_to_workers, epoch_cut, shard_pairs
from pipeline.shards import ShardInfo

SEED = 5


def shards(counts):
    """ShardInfos with contiguous ids (shard i starts after the counts of the shards before it)."""
    firsts = [sum(counts[:i]) for i in range(len(counts))]
    return [ShardInfo(f"s{i}", i, first, c, 0, "") for i, (first, c) in enumerate(zip(firsts, counts))]


# make_shards sizes (all full but the last) and sizes of shards indexed from other tools (any)
CASES = [[8, 8, 5], [7], [3, 3, 3, 3, 1], [64] * 5 + [17], [5, 9, 2, 7], [1, 12, 4, 4, 11]]


def rows_of(schedule, epoch, world_size=1):
    """{rank: [(cache_epoch, sample_id, view, partner)]} of one student epoch."""
    out = {}
    for r in range(world_size):
        out[r] = [(u.epoch, a, u.view, b) for u in schedule.rank_units(epoch, r, world_size)
                  for a, b in u.pairs(SEED, schedule.shards[u.shard])]
    return out


@pytest.mark.parametrize("counts", CASES)
@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("sampler", ["ra", "one_view"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_row_once_per_pass_and_n_rows_per_epoch(counts, views, sampler, world_size):
    sh = shards(counts)
    n, cached = sum(counts), 2
    sched = Schedule(sh, views, cached, SEED, sampler=sampler)
    seen = Counter()
    for t in range(cached * views):
        per_rank = rows_of(sched, t, world_size)
        assert [len(v) for v in per_rank.values()] == sched.rank_rows(t, world_size)
        assert max(sched.rank_rows(t, world_size)) - min(sched.rank_rows(t, world_size)) <= 1
        epoch_rows = {(e, a, v) for rows in per_rank.values() for e, a, v, _ in rows}
        assert sum(len(v) for v in per_rank.values()) == len(epoch_rows) == n == sched.rows(t)
        for rows in per_rank.values():
            for e, a, v, b in rows:
                seen[(e, a, v)] += 1
                # the mix partner's row is read in the same student epoch (same part of the cut)
                assert sampler == "one_view" or (e, b, v) in epoch_rows
    assert len(seen) == cached * n * views and set(seen.values()) == {1}
    # the next pass reads the same rows again, in another order
    again = {(e, a, v) for rows in rows_of(sched, cached * views).values() for e, a, v, _ in rows}
    first = {(e, a, v) for rows in rows_of(sched, 0).values() for e, a, v, _ in rows}
    assert again == first and sched.source(cached * views).cycle == 1


@pytest.mark.parametrize("counts", CASES)
def test_caching_job_rows_match_student_units(counts):
    """shard_pairs (what the caching job scores) = the union of the students' units, partners included."""
    sh, views = shards(counts), 3
    for sampler in ("ra", "one_view"):
        sched = Schedule(sh, views, 2, SEED, sampler=sampler)
        student = {(e, a, v, b) for t in range(2 * views) for rows in rows_of(sched, t, 2).values()
                   for e, a, v, b in rows}
        job = {(e, a, v, b) for e in range(2) for s in sh for v in range(views)
               for a, b in shard_pairs(epoch_cut(SEED, e, views), v, s)}
        assert student == job


def test_parts_split_every_shard_evenly_and_pair_inside():
    """Each part holds ``count`` rows of every shard (about count/V samples x V views); partners are
    paired inside a part; with V = 1 the pairing is plain plan.mix_pairs over the whole shard."""
    from pipeline.plan import mix_pairs

    sh = shards([8, 8, 5])
    cut = epoch_cut(SEED, 0, 3)
    for s in sh:
        parts = [[m for v in range(3) for m in cut.members(s, j, v)] for j in range(3)]
        assert [len(p) for p in parts] == [s.count] * 3
        assert sorted(m for p in parts for m in p) == sorted(list(range(s.first_id, s.first_id + s.count)) * 3)
        for j in range(3):
            for v in range(3):
                members = set(cut.members(s, j, v))
                assert all(a in members and b in members
                           for a, b in mix_pairs(SEED, 0, v, s, tuple(sorted(members)), j))
        assert {a for a, _ in shard_pairs(cut, 1, s)} == set(range(s.first_id, s.first_id + s.count))
    one = epoch_cut(SEED, 0, 1)
    assert all(shard_pairs(one, 0, s) == mix_pairs(SEED, 0, 0, s) for s in sh)


def test_every_student_epoch_sees_every_shard():
    """Class-sorted shards still give every class in every student epoch (a part of each shard)."""
    sched = Schedule(shards([8] * 6), 3, 2, SEED, sampler="ra")
    for t in range(6):
        assert {u.shard for u in sched.units(t)} == set(range(6))
        assert all(sum(u.rows for u in sched.units(t) if u.shard == s) == 8 for s in range(6))


def test_views_of_a_sample_go_to_different_ranks():
    sh = shards([64] * 12)
    sched = Schedule(sh, 3, 1, SEED, sampler="ra")
    where: dict[int, set] = {}
    count: Counter = Counter()
    for t in range(3):
        for r, rows in rows_of(sched, t, 4).items():
            for _, a, _, _ in rows:
                where.setdefault(a, set()).add(r)
                count[a] += 1
    assert set(count.values()) == {3}
    spread = sum(len(r) == 3 for r in where.values()) / len(where)
    assert spread > 0.9, spread   # only samples of units split at a rank boundary share a rank


def test_sources_and_needed_items():
    sched = Schedule(shards([8, 8, 5]), 3, 4, SEED, sampler="ra")
    assert [(s.cache_epoch, s.part) for s in map(sched.source, range(7))] == \
        [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert all(set(sched.needed_items(t)) == {(0, s) for s in range(3)} for t in range(3))
    one = Schedule(shards([8, 8, 5]), 3, 4, SEED, sampler="one_view")
    assert [(s.cache_epoch, s.view) for s in map(one.source, range(4))] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert len(one.needed_items(0)) == 3
    with pytest.raises(ValueError, match="sampler"):
        Schedule(shards([8]), 1, 1, 0, sampler="random")


def test_deal_to_workers_keeps_shards_together_and_balances_rows():
    sched = Schedule(shards([64] * 10 + [5]), 3, 1, SEED)
    units = sched.rank_units(0, 0, 1)
    lists = deal_to_workers(units, 3)
    assert Counter(u for lst in lists for u in lst) == Counter(units)
    owner = {}
    for w, lst in enumerate(lists):
        for u in lst:
            assert owner.setdefault(u.shard, w) == w   # one worker reads a shard, for all its views
    loads = [sum(u.rows for u in lst) for lst in lists]
    assert max(loads) - min(loads) <= 64


def test_imagenet_sized_schedule_is_exact_and_cheap():
    counts = [1000] * 1281 + [167]
    sched = Schedule(shards(counts), 3, 100, 0)
    start = time.perf_counter()
    assert [sched.rows(t) for t in range(3)] == [1_281_167] * 3
    rank_rows = sched.rank_rows(0, 8)
    assert sum(rank_rows) == 1_281_167 and max(rank_rows) - min(rank_rows) <= 1
    assert sched.steps(0, 128, 8) == 1252
    assert time.perf_counter() - start < 5   # no per-row work: a few ms per epoch
