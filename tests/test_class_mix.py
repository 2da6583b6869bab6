"""Class mixing on an ImageNet-shaped (class-sorted) folder tree: make_shards shuffles, the loader
interleaves shards, and Mixup/CutMix partners are as class-random as uniform sampling."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from pipeline.loader import LoaderConfig, ReplayLoader
from pipeline.make_shards import main as make_shards_main
from pipeline.plan import AugConfig
from pipeline.schedule import Schedule
from pipeline import classmix
from pipeline.classmix import class_mix, class_mix_warning
from pipeline.manifest import load_manifest
from pipeline.shards import iter_samples

C, PER_CLASS, SHARD, BATCH, VIEWS = 20, 12, 32, 16, 3
AUG = AugConfig(auto_augment=None, re_prob=0.0)   # mixing on; cheap pixels


@pytest.fixture(scope="module")
def sorted_tree(tmp_path_factory, make_imagefolder_module):
    root = tmp_path_factory.mktemp("sorted_tree")
    names = [f"n{i:08d}" for i in range(C)]   # synset-like folder names, listed in sorted order
    make_imagefolder_module(root / "train", classes=names, per_class=PER_CLASS, size=(20, 16))
    out = {}
    for name, extra in (("shuffled", []), ("sorted", ["--keep-order"])):
        make_shards_main(["imagefolder", "--train-dir", str(root / "train"), "--out", str(root / name),
                          "--shard-size", str(SHARD)] + extra)
        out[name] = root / name / "train"
    return out


@pytest.fixture(scope="module")
def make_imagefolder_module():
    from conftest import build_imagefolder

    return build_imagefolder


def batch_stats(split, num_workers: int, rank: int = 0, world_size: int = 1) -> tuple[float, float, int]:
    """(mean distinct classes per batch, the same for a uniformly random draw of as many distinct
    samples from the rows the epoch reads, batches) over one pass of the cache (V student epochs, ra
    sampler). A batch holds about B/V samples with their views (repeated augmentation, as DeiT's
    RASampler on one process), so the baseline draws samples, not rows."""
    m = load_manifest(split)
    label = {s.sample_id: s.label for s in iter_samples(m)}
    sched = Schedule(m.shards, VIEWS, 1, seed=0, sampler="ra")
    distinct, uniform = [], []
    for t in range(VIEWS):
        cfg = LoaderConfig(batch_size=BATCH, out_size=16, num_workers=num_workers)
        order = sched.order(t, rank, world_size, BATCH, lanes=cfg.lanes, drop_last=True)
        rows = Counter(label[int(a)] for ix in order.steps for a in order.rows.sample[ix])
        for b in ReplayLoader(m, AUG, 0, order, cfg):
            distinct.append(len(set(b["label"].tolist())))
            uniform.append(classmix.expected_distinct(list(rows.values()), len(set(b["sample_id"].tolist()))))
    return sum(distinct) / len(distinct), sum(uniform) / len(uniform), len(distinct)


def same_class_pair_rate(split) -> tuple[float, int]:
    m = load_manifest(split)
    label = {s.sample_id: s.label for s in iter_samples(m)}
    sched = Schedule(m.shards, VIEWS, 2, seed=0)
    pairs = [(a, b) for t in range(2 * VIEWS) for u in sched.units(t) for a, b in u.pairs(0, m.shards[u.shard])]
    return sum(label[a] == label[b] for a, b in pairs) / len(pairs), len(pairs)


def test_make_shards_shuffles_a_class_sorted_tree(sorted_tree):
    shuffled, kept = load_manifest(sorted_tree["shuffled"]), load_manifest(sorted_tree["sorted"])
    mix, bad = class_mix(shuffled), class_mix(kept)
    assert mix.ratio > 0.9 and class_mix_warning(shuffled) is None
    assert bad.ratio < 0.4 and "class-sorted" in class_mix_warning(kept)
    assert abs(mix.same_pair - mix.same_pair_random) < 0.02 and bad.same_pair > 5 * bad.same_pair_random


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_batches_class_mixed_like_uniform_sampling(sorted_tree, num_workers):
    got, uniform, n = batch_stats(sorted_tree["shuffled"], num_workers)
    assert n >= 40 and got >= 0.9 * uniform, (got, uniform)


def test_batches_class_mixed_on_two_ranks(sorted_tree):
    for rank in (0, 1):
        got, uniform, _ = batch_stats(sorted_tree["shuffled"], 2, rank, 2)
        assert got >= 0.9 * uniform, (rank, got, uniform)


def test_class_sorted_shards_still_give_mixed_batches(sorted_tree):
    """Shards written by another tool in class order: the loader's interleaving still mixes batches
    (a shard here holds ~3 classes, so one shard at a time would give ~3 per batch). A step draws
    on the ``interleave`` shards of its lane's window (4 of the 8 here); at ImageNet scale (~1
    class per shard) it gives about that many classes per batch, hence the warning."""
    m = load_manifest(sorted_tree["sorted"])
    one_at_a_time = sum(len(s.class_counts) for s in m.shards) / len(m.shards)
    for workers in (1, 2):
        got, uniform, _ = batch_stats(sorted_tree["sorted"], workers)
        # a batch holds ~B/V = 5.3 samples (their views together); from one shard they could
        # show at most its ~3 classes
        assert got >= 0.8 * uniform and got > 1.5 * one_at_a_time, (workers, got, uniform, one_at_a_time)


def test_mix_partners_as_class_random_as_uniform(sorted_tree):
    rate, n = same_class_pair_rate(sorted_tree["shuffled"])
    tolerance = 3 * math.sqrt((2 / C) * (1 - 2 / C) / n)   # three binomial standard errors
    assert rate <= 2 / C + tolerance, (rate, n)
    # the same measure on class-sorted shards (~3 classes per shard): far above uniform
    assert same_class_pair_rate(sorted_tree["sorted"])[0] > 5 / C
