"""The caching job's data path: persistent replay workers, decode once, prefetch, Ray replay.

Real Fashion-MNIST shards (4 x 64), the tiny timm regnety_002 teacher of test_cache_job, real
worker processes; the simulated accelerator (bench/simulated.py) where a slow teacher is
needed. Pixels and stored rows must not depend on worker count, placement or timing.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest


from pipeline import premix as premix_module  # noqa: E402
from teacher.feed import ItemFeed  # noqa: E402
from teacher.job import CacheJobConfig, cache_attrs, make_teacher, open_writer  # noqa: E402
from teacher.pool import InlinePool, ProcessPool  # noqa: E402
from concurrent.futures.process import BrokenProcessPool  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from teacher.work import run_item  # noqa: E402
from test_cache_job import TINY_TEACHER, teacher_ckpt  # noqa: E402,F401  (the same tiny teacher file)


def make_cfg(shards, out, teacher: dict, **kw) -> CacheJobConfig:
    d = dict(shards=str(shards), out=str(out), epochs=1, views=2, k=5, seed=0, batch_size=48,
             num_workers=0, actors=1, max_retries=1, teacher=teacher)
    d.update(kw)
    return CacheJobConfig.from_dict(d)


def rows_of(cache: str, epoch: int = 0, ids=None):
    """(logprobs, indices, valid) of every view of ``ids`` (default: every sample)."""
    from storage import open_cache

    r = open_cache(cache)
    ids = np.arange(r.attrs["num_samples"]) if ids is None else np.asarray(ids)
    return r.lookup_rows(epoch, np.repeat(ids, r.views), np.tile(np.arange(r.views), len(ids)))[:3]


def assert_same_rows(a: str, b: str) -> None:
    for x, y in zip(rows_of(a), rows_of(b), strict=True):
        np.testing.assert_array_equal(x, y)


def run_items(cfg, feed=None, items=None):
    """run_item over ``items`` (default every shard of epoch 0), each naming the next as prefetch."""
    m = load_manifest(cfg.shards)
    teacher, writer = make_teacher(cfg), open_writer(cfg, m, cache_attrs(cfg, m))
    items = items or [(0, s.index) for s in m.shards]
    return [run_item(cfg, *item, teacher=teacher, writer=writer, manifest=m, feed=feed,
                     prefetch=items[i + 1] if i + 1 < len(items) else None)
            for i, item in enumerate(items)]


def test_same_worker_processes_serve_consecutive_items(fmnist_shards, teacher_ckpt, tmp_path):
    teacher = {**TINY_TEACHER, "checkpoint": teacher_ckpt}
    inline = make_cfg(fmnist_shards / "train", tmp_path / "inline.zarr", teacher)
    pooled = inline.replace(out=str(tmp_path / "pooled.zarr"), num_workers=2)
    m = load_manifest(pooled.shards)
    feed = ItemFeed(pooled, m, 32)
    try:
        pids = feed.pool.pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
        results = run_items(pooled, feed)
        assert feed.pool.pids == pids
        for pid in pids:
            os.kill(pid, 0)  # still alive after every item
    finally:
        feed.close()
    assert len(results) == len(m.shards) >= 4
    for res in results:
        assert res.images == pooled.views * m.shards[res.shard_index].count and res.skipped == []
        assert res.worker_pids and set(res.worker_pids) <= set(pids)
    assert set().union(*(r.worker_pids for r in results)) == set(pids)
    run_items(inline)  # no workers, one feed per item: the same rows bit for bit
    assert_same_rows(inline.out, pooled.out)


def test_each_sample_decoded_once_for_all_views_and_partners(fmnist_shards, teacher_ckpt, tmp_path, monkeypatch):
    decoded = Counter()
    real = premix_module.decode_image

    def counting(raw, *args):
        decoded[raw.sample_id] += 1
        return real(raw, *args)

    monkeypatch.setattr(premix_module, "decode_image", counting)
    cfg = make_cfg(fmnist_shards / "train", tmp_path / "c.zarr", {**TINY_TEACHER, "checkpoint": teacher_ckpt},
                   views=3)
    shard = load_manifest(cfg.shards).shards[1]
    (res,) = run_items(cfg, items=[(0, 1)])
    assert res.images == 3 * shard.count  # every view, every row mixed with its partner
    assert decoded == Counter(range(shard.first_id, shard.first_id + shard.count))


class _RecordingPool:
    """A real ProcessPool that logs when each task of each epoch is handed to it."""

    def __init__(self, workers: int, log: list):
        self.inner, self.log = ProcessPool(workers), log
        self.depth, self.pids = self.inner.depth, self.inner.pids

    def submit(self, fn, samples, *args):
        self.log.append(("submit", samples[0].shard, time.perf_counter()))
        return self.inner.submit(fn, samples, *args)

    def close(self):
        self.inner.close()


def test_next_item_replayed_while_teacher_scores(fmnist_shards, tmp_path):
    slow = dict(callable="bench.simulated:sleeping_net", num_classes=10, input_size=32, amp="none",
                channels_last=False, model_kwargs={"images_per_s": 200.0, "num_classes": 10})
    cfg = make_cfg(fmnist_shards / "train", tmp_path / "c.zarr", slow, num_workers=1)
    m = load_manifest(cfg.shards)
    log: list = []
    feed = ItemFeed(cfg, m, 32, pool=_RecordingPool(1, log))
    teacher = make_teacher(cfg)
    score = teacher.score

    def logged(images):
        out = score(images)
        log.append(("scored", None, time.perf_counter()))
        return out

    teacher.score = logged
    writer = open_writer(cfg, m, cache_attrs(cfg, m))
    try:
        run_item(cfg, 0, 0, teacher=teacher, writer=writer, manifest=m, feed=feed, prefetch=(0, 1))
        last_scored = max(t for kind, _, t in log if kind == "scored")
        next_submitted = [t for kind, shard, t in log if kind == "submit" and shard == m.shards[1].name]
        assert next_submitted and min(next_submitted) < last_scored  # shard 1 replayed during shard 0
        res = run_item(cfg, 0, 1, teacher=teacher, writer=writer, manifest=m, feed=feed)
        assert res.images == cfg.views * m.shards[1].count
    finally:
        feed.close()


def _corrupt(tar_path, which: int = 3) -> str:
    """Rewrite the tar with the ``which``-th image truncated; return its key."""
    import io
    import tarfile

    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    victim = [m for m, _ in members if m.name.endswith(".png")][which]
    with tarfile.open(tar_path, "w") as tf:
        for m, data in members:
            if m.name == victim.name:
                data = data[:40]
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return victim.name.rsplit(".", 1)[0]


def test_corrupt_sample_same_records_with_workers(fmnist_shards, teacher_ckpt, tmp_path):
    import shutil

    split = tmp_path / "train"
    shutil.copytree(fmnist_shards / "train", split)
    key = _corrupt(split / "train-000001.tar")
    teacher = {**TINY_TEACHER, "checkpoint": teacher_ckpt}
    records = {}
    for workers in (0, 2):
        cfg = make_cfg(split, tmp_path / f"c{workers}.zarr", teacher, num_workers=workers)
        (res,) = run_items(cfg, items=[(0, 1)])
        records[workers] = sorted((r["sample_id"], r["view"], r["reason"].split(": cannot decode")[0])
                                  for r in res.skipped)  # the rest names a PIL object's address
        assert key in {r["key"] for r in res.skipped}
        assert all("cannot decode" in r["reason"] for r in res.skipped)
    assert records[0] == records[2] and len(records[0]) >= 2  # own rows + partners' rows
    shard = load_manifest(split).shards[1]
    ids = range(shard.first_id, shard.first_id + shard.count)
    lp0, ix0, v0 = rows_of(str(tmp_path / "c0.zarr"), ids=ids)
    lp2, ix2, v2 = rows_of(str(tmp_path / "c2.zarr"), ids=ids)
    assert (~v0).sum() == len(records[0])
    np.testing.assert_array_equal(v0, v2)
    np.testing.assert_array_equal(lp0[v0], lp2[v2])


def test_lost_replay_worker_fails_the_item_instead_of_hanging(fmnist_shards, teacher_ckpt, tmp_path):
    cfg = make_cfg(fmnist_shards / "train", tmp_path / "c.zarr", {**TINY_TEACHER, "checkpoint": teacher_ckpt},
                   num_workers=1)
    m = load_manifest(cfg.shards)
    feed = ItemFeed(cfg, m, 32)
    def hung(*_):
        raise TimeoutError("run_item hung after its replay worker died")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        os.kill(feed.pool.pids[0], signal.SIGKILL)
        with pytest.raises(BrokenProcessPool):
            run_items(cfg, feed, items=[(0, 0)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        feed.close()


def test_feed_close_stops_its_threads(fmnist_shards, teacher_ckpt, tmp_path):
    cfg = make_cfg(fmnist_shards / "train", tmp_path / "c.zarr", {**TINY_TEACHER, "checkpoint": teacher_ckpt})
    before = set(threading.enumerate())
    feed = ItemFeed(cfg, load_manifest(cfg.shards), 32, pool=InlinePool())
    feed.start(0, 0)
    feed.start(0, 1)  # started, never read: close must still return
    feed.close()
    assert set(threading.enumerate()) <= before


# ----------------------------------------------------------------------------- through Ray


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_replay_as_ray_tasks_gives_the_same_rows(ray_session, fmnist_shards, teacher_ckpt, tmp_path):
    from teacher.cache import run_job

    teacher = {**TINY_TEACHER, "checkpoint": teacher_ckpt}
    local = make_cfg(fmnist_shards / "train", tmp_path / "local.zarr", teacher)
    cluster = local.replace(out=str(tmp_path / "ray.zarr"), replay="ray", num_workers=2)
    summary = run_job(cluster, progress=False)
    m = load_manifest(local.shards)
    assert summary["items_run"] == len(m.shards) and summary["images"] == local.views * m.num_samples
    run_items(local)
    assert_same_rows(local.out, cluster.out)


def test_actor_keeps_its_worker_processes(ray_session, fmnist_shards, teacher_ckpt, tmp_path):
    from teacher.cache import TeacherWorker

    cfg = make_cfg(fmnist_shards / "train", tmp_path / "c.zarr", {**TINY_TEACHER, "checkpoint": teacher_ckpt},
                   num_workers=2)
    m = load_manifest(cfg.shards)
    actor = ray_session.remote(TeacherWorker).options(num_cpus=1).remote(cfg.to_dict(), cache_attrs(cfg, m))
    try:
        pids = ray_session.get(actor.worker_pids.remote())
        first = ray_session.get(actor.run.remote(0, 0, prefetch=(0, 1)))
        second = ray_session.get(actor.run.remote(0, 1))
        assert ray_session.get(actor.worker_pids.remote()) == pids and len(set(pids)) == 2
        assert set(first["worker_pids"]) | set(second["worker_pids"]) <= set(pids)
        assert first["worker_pids"] and second["worker_pids"]
    finally:
        ray_session.kill(actor)


def test_failed_batches_give_their_buffers_back(fmnist_shards, teacher_ckpt, tmp_path):
    """A teacher error on every item must not use up the feed's batch buffers (it would hang)."""
    from teacher.work import score_item

    cfg = make_cfg(fmnist_shards / "train", tmp_path / "c.zarr", {**TINY_TEACHER, "checkpoint": teacher_ckpt},
                   batch_size=16)
    m = load_manifest(cfg.shards)
    teacher = make_teacher(cfg)

    class Failing:
        k = teacher.k

        def score(self, images):
            raise RuntimeError("teacher failed")

    feed = ItemFeed(cfg, m, 32, pool=InlinePool())
    try:
        for _ in range(3):
            for s in m.shards:  # 12 failed items > the 5 buffers a feed has
                with pytest.raises(RuntimeError, match="teacher failed"):
                    score_item(feed, Failing(), 0, s.index, prefetch=(0, (s.index + 1) % len(m.shards)))
        scored = score_item(feed, teacher, 0, 0)
        assert len(scored.sample_id) == cfg.views * m.shards[0].count
    finally:
        feed.close()
