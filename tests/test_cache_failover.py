"""Failover of the caching job: a node lost mid-job, on a 2-node local Ray cluster.

Head and worker node have 1 CPU each, so the job's 2 teacher actors (1 CPU each) sit one per
node. The worker node's raylet and its processes are killed (no graceful shutdown) once a few
items are done. The replacement actor the job requests can never be placed (the surviving actor
holds the only CPU left), so the job must hand the lost item to the survivor, finish there in
bounded time, kill the pending replacement, and say what it lost; the store must be
byte-identical to a clean run of the same config, every item done once.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from teacher.job import CacheJobConfig, cache_attrs, make_teacher, open_writer  # noqa: E402
from teacher.calibrate import calibrate_tail  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from teacher.work import run_item  # noqa: E402
from storage import open_cache  # noqa: E402
from test_cache_job import TINY_TEACHER, make_cfg, teacher_ckpt  # noqa: E402,F401  (the module's tiny teacher)

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300  # the whole job, kill included: ~20-90 s on the 2-core machine (idle to loaded); a hang never ends


def _clean_store(cfg: CacheJobConfig) -> None:
    """The same cache made without Ray, item by item in this process (the job's per-item work)."""
    manifest = load_manifest(cfg.shards)
    writer, teacher = open_writer(cfg, manifest, cache_attrs(cfg, manifest)), make_teacher(cfg)
    calibrate_tail(cfg, manifest, teacher, writer)
    for epoch in range(cfg.epochs):
        for shard in range(len(manifest.shards)):
            run_item(cfg, epoch, shard, teacher=teacher, writer=writer, manifest=manifest)


def _files(root: Path) -> dict[str, bytes]:
    """Every stored file of a cache but the job summary (which holds timings)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "summary.json"}


@pytest.fixture
def two_node_cluster(monkeypatch):
    """Head (1 CPU) + worker node (1 CPU); its Ray address file stays in a private temp dir, so no
    bare ``ray.init()`` elsewhere on this machine joins it."""
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # short: Ray's socket paths are length-limited
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    node_args = dict(num_cpus=1, object_store_memory=128 * 1024**2)
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    try:
        worker = cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_lost_node_job_finishes_on_the_survivor_byte_identical(two_node_cluster, fmnist_shards, teacher_ckpt,
                                                               tmp_path):
    cluster, worker = two_node_cluster
    # the tiny teacher at its usual stem stride (2): the test is about items, not their cost
    teacher = {**TINY_TEACHER, "stem_stride": None, "checkpoint": teacher_ckpt}
    # 32 items: the job must still be running when Ray notices the node's death (with 16, a loaded
    # machine once let the survivor finish them all before the lost actor's call failed)
    cfg = make_cfg(fmnist_shards / "train", tmp_path / "c.zarr", teacher_ckpt, epochs=8, views=1, actors=2,
                   teacher=teacher, tail={"dim": 4, "calibration_rows": 256})
    total = cfg.epochs * len(load_manifest(cfg.shards).shards)
    cfg.save(tmp_path / "job.yaml")
    cmd = [sys.executable, "-m", "teacher.cache", "--config", str(tmp_path / "job.yaml"),
           "--ray-address", cluster.address, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out, err = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=err)
    deadline = time.time() + JOB_TIMEOUT_S
    done: set = set()
    try:
        while time.time() < deadline and proc.poll() is None and len(done) < 3:
            try:
                done = open_cache(cfg.out).done_items()
            except (FileNotFoundError, KeyError, RuntimeError, ValueError):
                pass
            time.sleep(0.1)
        assert 3 <= len(done) < total - 2, f"could not kill the node mid-job (done={sorted(done)})"
        cluster.remove_node(worker, allow_graceful=False)   # its raylet, the actor on it, everything
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not finish within {JOB_TIMEOUT_S} s of its start, a node lost mid-way "
                        f"({len(open_cache(cfg.out).done_items())}/{total} items done)")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close(), err.close()
    assert proc.returncode == 0, stderr[-3000:]

    summary = json.loads((tmp_path / "c.zarr" / "summary.json").read_text())
    every = [[e, s] for e in range(cfg.epochs) for s in range(total // cfg.epochs)]
    assert summary["items"] == every and summary["items_run"] == total == summary["items_total"]  # each once
    assert summary["items_failed"] == [] and summary["items_done_before"] == 0
    assert open_cache(cfg.out).done_items() == {tuple(i) for i in every}
    # the lost actor's item ran again on the survivor; its replacement never found a CPU and was killed
    assert (summary["actors_lost"], summary["retries"], summary["actors_replaced"],
            summary["replacements_cancelled"]) == (1, 1, 0, 1), summary
    last = stdout.strip().splitlines()[-1]
    assert f"{total}/{total} items done" in last and "1 actor lost, 1 item retried, 0 replaced" in last, last

    clean = cfg.replace(out=str(tmp_path / "clean.zarr"))
    _clean_store(clean)
    got, want = _files(tmp_path / "c.zarr"), _files(tmp_path / "clean.zarr")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
