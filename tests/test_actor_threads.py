"""A teacher actor computes with the CPUs Ray gave it, whatever the node's environment says.

Ray sets OMP_NUM_THREADS from num_cpus only when the environment has none; here the driver
exports OMP_NUM_THREADS=3 (as a node's profile might), so without ``teacher.pool.use_ray_cpus``
every actor would run torch with 3 threads on its 1 or 2 CPUs.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from teacher.job import CacheJobConfig, cache_attrs  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402

SIMULATED = dict(callable="bench.simulated:sleeping_net", num_classes=10, input_size=32, amp="none",
                 channels_last=False, model_kwargs={"images_per_s": 1e6, "num_classes": 10})


@pytest.fixture()
def ray_with_omp_env(monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("needs its own Ray instance (one is running in this process)")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # inherited by the raylet and every worker it starts
    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_teacher_actor_threads_follow_its_num_cpus(ray_with_omp_env, fmnist_shards, tmp_path):
    import torch

    from teacher.cache import TeacherWorker

    ray = ray_with_omp_env
    cfg = CacheJobConfig.from_dict(dict(shards=str(fmnist_shards / "train"), out=str(tmp_path / "c.zarr"), epochs=1,
                                        views=1, k=5, seed=0, batch_size=16, num_workers=0, actors=1,
                                        teacher=SIMULATED))
    m = load_manifest(cfg.shards)
    attrs = cache_attrs(cfg, m)
    seen = {}
    for cpus in (1, 2):
        actor = ray.remote(TeacherWorker).options(num_cpus=cpus).remote(cfg.to_dict(), attrs)
        try:
            seen[cpus] = ray.get(actor.__ray_call__.remote(
                lambda self: (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))))
        finally:
            ray.kill(actor)
    assert seen[1][1] == seen[2][1] == "3", f"the actors' environment should carry OMP_NUM_THREADS=3: {seen}"
    assert {cpus: threads for cpus, (threads, _) in seen.items()} == {1: 1, 2: 2}, seen
