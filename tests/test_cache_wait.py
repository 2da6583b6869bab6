"""A student started together with the caching job (cache.wait=true): it waits for the store to
appear, then for each (epoch, shard) item, saying what it waits for; throughput leaves the waiting
out and reports it on its own (train_wait_s).
"""
from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import pytest
import torch

from teacher.job import cache_attrs, make_teacher, open_writer
from pipeline.manifest import load_manifest
from teacher.work import run_item
from storage import wait_for_cache
from student.loop import LoopParts, LoopState, Precision, StepConfig, train_epoch
from student.losses import DistillationLoss
from student.train import train
from test_student_data import build_cache, student_config


def test_student_started_before_the_store_exists(fmnist_shards, tmp_path, capsys):
    job = build_cache(fmnist_shards, tmp_path / "template.zarr", items=[])   # the job config + teacher file
    job = job.replace(out=str(tmp_path / "late.zarr"))
    manifest = load_manifest(job.shards)

    def caching_job():                      # starts 1.5 s after the student, writes items 4 s later
        from teacher.calibrate import calibrate_tail

        time.sleep(1.5)
        writer = open_writer(job, manifest, cache_attrs(job, manifest))
        teacher = make_teacher(job)
        calibrate_tail(job, manifest, teacher, writer)   # as the job does before handing out items
        time.sleep(4.0)
        for epoch in range(job.epochs):
            for s in range(len(manifest.shards)):
                run_item(job, epoch, s, teacher=teacher, writer=writer, manifest=manifest)

    thread = threading.Thread(target=caching_job)
    thread.start()
    try:
        metrics = train(student_config(fmnist_shards, Path(job.out), tmp_path / "run", "run.epochs=2",
                                       "cache.wait=true", "cache.poll_s=0.1", "cache.timeout_s=120",
                                       "data.max_batches=2", "run.eval_every=0", "data.val=null"))
    finally:
        thread.join()
    out = capsys.readouterr().out
    assert f"waiting for the caching job to create {job.out}" in out, out[-2000:]
    assert "waiting for teacher cache" in out and "epoch 0 shard 0" in out, out[-2000:]
    assert metrics["train_images"] == 32
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        first = [r for r in csv.DictReader(f) if r.get("train_images")][0]
    # epoch 1 waited for the job's items (seconds); that time is reported, not counted as training
    assert float(first["train_wait_s"]) > 1.0, first
    assert "waiting for the cache" in out


def test_wait_for_the_store_times_out_naming_it(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"absent\.zarr: not created by the caching job after 0s \(cache\.timeout_s=0\.3\)"):
        wait_for_cache(tmp_path / "absent.zarr", timeout=0.3, poll=0.1, log=None)
    assert time.monotonic() - start < 5.0


def test_a_store_waits_for_its_tail_basis(tmp_path):
    """A cache with a learned tail is not ready until the job has written the basis (before its
    first item): a student that opened it earlier could not rebuild a single target."""
    import numpy as np

    from storage import create_cache
    from storage.tail import TailModel

    path = tmp_path / "tailed.zarr"
    writer = create_cache(path, shards=[(0, 8)], epochs=1, views=1, k=2, num_classes=10, attrs={}, tail_dim=3)
    with pytest.raises(TimeoutError, match="tailed.zarr"):
        wait_for_cache(path, timeout=0.3, poll=0.1, log=None)
    logits = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    writer.write_tail(TailModel.fit(logits, 3, 3.5))
    assert wait_for_cache(path, timeout=5, poll=0.1, log=None).has_tail()


class _Clock:
    """Stands in for CacheReader.waited_s: seconds spent blocked on items not written yet."""

    waited_s = 0.0


def _batches(clock: _Clock, n: int, wait: float):
    for _ in range(n):
        time.sleep(wait)                    # blocked on the cache ...
        clock.waited_s += wait              # ... and accounted as such, as wait_done does
        yield {"image": torch.randn(8, 4), "target": torch.full((8, 3), 1 / 3)}


@pytest.mark.parametrize("counted", [True, False])
def test_throughput_excludes_cache_waits(counted):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    clock = _Clock()
    start = time.perf_counter()
    parts = LoopParts(model, DistillationLoss("none", 3), lambda b: None, torch.optim.SGD(model.parameters(), 0.1),
                      Precision(), torch.device("cpu"), wait_clock=(lambda: clock.waited_s) if counted else None)
    m = train_epoch(parts, StepConfig(num_batches=3), _batches(clock, 3, 0.4), LoopState())
    wall = time.perf_counter() - start
    busy = m["images"] / m["images_per_s"]
    if counted:
        assert m["wait_s"] == pytest.approx(1.2) and busy < wall - 1.1, (m, wall)
    else:                                   # without the clock the waiting would count as training
        assert m["wait_s"] == 0.0 and busy >= 1.2
