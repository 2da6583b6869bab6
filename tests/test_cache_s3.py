"""The teacher cache on object storage, end to end, on the local S3 server (moto, 127.0.0.1):
shards, manifest and cache all at ``s3://`` URLs. The Ray caching job is killed mid-way (SIGKILL
of the driver) and re-run: it resumes from the done markers, and the objects of the items
finished before the kill are never written again (the bucket is versioned: a rewrite would add
a version). Then the audit agrees 100 % and a student trains from the cache.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from teacher.audit import audit  # noqa: E402
from teacher.cache import run_job  # noqa: E402
from teacher.job import CacheJobConfig  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from hygiene import wait_session_gone  # noqa: E402
from servers import new_bucket  # noqa: E402
from storage import open_cache  # noqa: E402
from student.train import train  # noqa: E402
from teacher.model import TeacherConfig, create_model  # noqa: E402
from test_student_data import AUG, TINY_TEACHER, student_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "kdcache-cache"


def _versions(endpoint: str, prefix: str) -> dict[str, list[str]]:
    """Object key -> its version ids, under ``prefix`` of the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    out: dict[str, list[str]] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=BUCKET, Prefix=prefix):
        for v in page.get("Versions", []):
            out.setdefault(v["Key"], []).append(v["VersionId"])
    return out


def _item_keys(versions: dict, epoch: int, shard: int) -> dict:
    """The objects one (epoch, shard) item wrote: its chunk of every row array and its done marker."""
    return {k: v for k, v in versions.items() if f"/c/{epoch}/{shard}" in k}


def _settled_done_items(cache: str, quiet_s: float = 1.0) -> set:
    """The cache's done items once they stop changing for ``quiet_s`` (a request a dead writer sent
    may still be served by the S3 server a moment later)."""
    done, since = open_cache(cache).done_items(), time.time()
    while time.time() - since < quiet_s:
        time.sleep(0.2)
        now = open_cache(cache).done_items()
        if now != done:
            done, since = now, time.time()
    return done


def test_cache_job_on_s3_resumes_untouched_and_serves_a_student(fmnist_shards, s3_endpoint, tmp_path):
    import boto3
    import s3fs

    bucket = new_bucket(BUCKET)
    boto3.client("s3", endpoint_url=s3_endpoint).put_bucket_versioning(
        Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    fs = s3fs.S3FileSystem()
    for split in ("train", "val"):
        for f in sorted((fmnist_shards / split).iterdir()):
            fs.put_file(str(f), f"{BUCKET}/fmnist/{split}/{f.name}")
    weights = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model(TeacherConfig.from_dict(TINY_TEACHER)).state_dict(), weights)
    cfg = CacheJobConfig.from_dict({
        "shards": f"{bucket}/fmnist/train", "out": f"{bucket}/cache.zarr", "epochs": 2, "views": 2, "k": 3,
        "seed": 7, "batch_size": 64, "num_workers": 1, "actors": 1, "aug": AUG,
        "teacher": {**TINY_TEACHER, "checkpoint": str(weights)}, "tail": {"dim": 4, "calibration_rows": 256}})
    shards = len(load_manifest(cfg.shards).shards)
    total = cfg.epochs * shards

    cfg.save(tmp_path / "job.yaml")
    cmd = [sys.executable, "-m", "teacher.cache", "--config", str(tmp_path / "job.yaml"), "--ray-address", "local",
           "--no-progress"]
    # the job finds the server as users find theirs: FSSPEC_S3_ENDPOINT_URL and AWS_* in the environment
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    done: set = set()
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not done:
            try:
                done = open_cache(cfg.out).done_items()
            except (FileNotFoundError, KeyError, RuntimeError):
                pass
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # killpg reaches the driver and the Ray services it started, not the actors: the raylet gives
        # each worker a process group of its own (in the driver's session), and an actor still
        # finishes the item it is writing before it notices its raylet is gone. Count the done items
        # once every process of the job's session has exited, and its last writes have landed.
        left = wait_session_gone(proc.pid, timeout=60)
    assert not left, f"the killed job's processes still run after 60 s: {left}"
    done = _settled_done_items(cfg.out)
    assert 1 <= len(done) < total, f"could not kill the job mid-way (done={done}): {proc.stderr.read()[-2000:]}"
    before = _versions(s3_endpoint, "cache.zarr/")

    summary = run_job(cfg, progress=False)
    assert summary["items_done_before"] == len(done) and summary["items_run"] == total - len(done)
    after = _versions(s3_endpoint, "cache.zarr/")
    for epoch, shard in done:
        finished = _item_keys(before, epoch, shard)
        assert finished and all(len(v) == 1 for v in finished.values()), finished
        assert _item_keys(after, epoch, shard) == finished, f"item {(epoch, shard)} was written again"
    assert after["cache.zarr/tail_basis/c/0/0"] == before["cache.zarr/tail_basis/c/0/0"]  # the basis is reused

    reader = open_cache(cfg.out)
    assert reader.done_items() == {(e, s) for e in range(cfg.epochs) for s in range(shards)}
    n = reader.num_samples
    for epoch in range(cfg.epochs):
        assert reader.lookup_rows(epoch, np.repeat(np.arange(n), 2), np.tile(np.arange(2), n)).valid.all()
    report = audit(cfg.out, samples=64)   # shards and cache both read from S3
    assert all(r["top1_agree"] == 1.0 and r["rows"] == 64 for r in report.values()), report

    metrics = train(student_config(REPO, cfg.out, tmp_path / "student", f"data.train={bucket}/fmnist/train",
                                   f"data.val={bucket}/fmnist/val"))
    assert metrics["train_images"] == n and metrics["train_dropped"] == 0
    assert 0.0 <= metrics["val_top1_fused"] <= 100.0
