"""Caching-job benchmark: caching vs bare teacher forward, reader rows/s, 1 vs 2 Ray workers.

    python bench/cache.py [--samples 1024] [--out bench/results/cache.json]   # ~3 min on 2 CPU cores

Teacher: timm ``regnety_002`` (random weights, fixed seed; 1000 classes; 224 px; fp32 on CPU,
bf16 autocast on CUDA) over Fashion-MNIST images (PNG 28 px, replayed with the full DeiT-B plan
at 224 px: RRC, flip, RandAugment, erasing, mixup/cutmix), 1 epoch x 1 view, k = 10.
At 224 px the forward dominates on CPU, as RegNetY-16GF's does on a GPU.

* ``cache_over_forward``: images/s of :func:`teacher.work.run_item` (read shard, replay in
  1 decode process, score, write) ÷ images/s of ``Teacher.forward_logits`` alone on the
  same device and batch size, measured side by side in this run. On CPU the teacher gets
  ``cpu_count - num_workers`` threads in BOTH measurements, so the decode process has a core
  of its own — as on a GPU node, where decoding runs on CPU cores beside the GPU. The question
  measured is whether reading, replaying and writing hide behind the forward.
* ``reader_rows_per_s``: ``CacheReader.lookup_rows`` (what the student reads: top-k, tail mass and
  tail code) of random batches of 256 rows (one epoch).
* ``ray_2_over_1``: steady images/s (after actor start-up and the tail calibration) of the same
  Ray job with 2 vs 1 CPU actor (fresh caches), each actor ``num_cpus=1`` with inline replay
  (``num_workers=0``). Scaling, not oversubscription: the run with A actors gets a Ray instance
  of A CPUs whose processes are pinned to A cores (``sched_setaffinity`` before ``ray.init``, so
  an actor's replay thread cannot borrow an idle core), and every actor's torch uses its
  ``num_cpus`` threads (``teacher.pool.use_ray_cpus``; ``actor_torch_threads`` is what a probe
  actor with the same options got). Runs alternate 1, 2, 1, 2 (``--repeats``), the ratio is the
  median of each 2-actor run over the mean of the 1-actor runs around it; the rates including
  start-up and calibration are reported beside it.
* ``calibration_seconds``: the learned tail's calibration (the teacher's full logits of the first
  ``tail.calibration_rows`` rows, then the fit), paid once per cache before any item; it is
  timed apart from the item rate.
* ``stored_bytes_per_sample_epoch``: bytes on disk of the cache ``cache_over_forward`` wrote
  (this run, the current storage format), per sample-epoch (views=1 here). It counts the tail
  basis and per-item records at this small size; the per-row size at scale of real rows is
  ``bench/storage.py``'s (bench/results/storage.json), not copied here.

``provenance`` (bench/_env.py): commit, machine, package versions. The machine may be shared:
``provenance.machine.load_average`` is the load when the JSON was written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER = dict(name="regnety_002", num_classes=1000, input_size=224, amp="auto", channels_last=True)


def make_inputs(work: Path, samples: int, shard_size: int = 256) -> tuple[str, str]:
    import torch

    from pipeline.make_shards import fmnist_samples, load_fmnist
    from pipeline.writer import write_shards
    from teacher.model import TeacherConfig, create_model

    images, labels = load_fmnist("train", limit=samples)
    classes = [f"class_{i}" for i in range(1000)]  # a 1000-way teacher; labels stay 0..9
    write_shards(fmnist_samples("train", images, labels), work / "ds", "train", classes, shard_size,
                 overwrite=True)
    torch.manual_seed(0)
    ckpt = work / "teacher.pt"
    torch.save(create_model(TeacherConfig(**TEACHER)).state_dict(), ckpt)
    return str(work / "ds" / "train"), str(ckpt)


def job_config(shards: str, ckpt: str, out: str, **kw):
    from teacher.job import CacheJobConfig

    d = dict(shards=shards, out=out, epochs=1, views=1, k=10, batch_size=64, num_workers=1, actors=1,
             teacher={**TEACHER, "checkpoint": ckpt})
    d.update(kw)
    return CacheJobConfig.from_dict(d)


def bench_item_vs_forward(cfg) -> dict:
    """run_item images/s and bare-forward images/s, same device/batch, one process."""
    import torch

    from teacher.job import cache_attrs, make_teacher, open_writer
    from teacher.calibrate import calibrate_tail
    from pipeline.manifest import load_manifest
    from teacher.work import run_item

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the decode worker gets its own core (see the module docstring)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.num_workers))
    m = load_manifest(cfg.shards)
    teacher = make_teacher(cfg, device)
    writer = open_writer(cfg, m, cache_attrs(cfg, m))
    x = torch.randn(cfg.batch_size, 3, cfg.teacher.input_size, cfg.teacher.input_size)
    teacher.forward_logits(x)  # warm-up
    n_batches = max(1, m.num_samples // cfg.batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        teacher.forward_logits(x)
    if device == "cuda":
        torch.cuda.synchronize()
    forward = n_batches * cfg.batch_size / (time.perf_counter() - t0)
    # the tail basis is fitted once per cache, before any item (the Ray job does it on one actor):
    # timed apart, so the item rate is what every later item costs
    t0 = time.perf_counter()
    calibrate_tail(cfg, m, teacher, writer)
    calibration = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = sum(run_item(cfg, 0, s, teacher=teacher, writer=writer, manifest=m).images
                 for s in range(len(m.shards)))
    caching = images / (time.perf_counter() - t0)
    return {"device": device, "batch_size": cfg.batch_size, "forward_images_per_s": forward,
            "caching_images_per_s": caching, "cache_over_forward": caching / forward,
            "calibration_seconds": calibration, "calibration_rows": min(cfg.tail.calibration_rows, m.num_samples)}


def bench_reader(cache: str, batch: int = 256, seconds: float = 3.0) -> float:
    from storage import open_cache

    r = open_cache(cache)
    n = r.attrs["num_samples"]
    rng = np.random.default_rng(0)
    r.lookup_rows(0, np.arange(min(n, batch)), np.zeros(min(n, batch), np.int64))  # warm chunk cache
    rows, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ids = rng.integers(0, n, batch)
        r.lookup_rows(0, ids, rng.integers(0, r.views, batch))
        rows += batch
    return rows / (time.perf_counter() - t0)


def _probe_threads(ray) -> dict:
    """torch threads and OMP_NUM_THREADS of an actor with the teacher actors' options, after
    ``use_ray_cpus`` (what ``TeacherWorker.__init__`` runs first)."""

    class Probe:
        def threads(self):
            import torch

            from teacher.pool import use_ray_cpus

            before = torch.get_num_threads()
            return {"omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "torch_threads_before_pin": before,
                    "torch_threads": use_ray_cpus() or torch.get_num_threads()}

    probe = ray.remote(Probe).options(num_cpus=1).remote()
    try:
        return ray.get(probe.threads.remote())
    finally:
        ray.kill(probe)


def ray_run(shards: str, ckpt: str, out: str, actors: int) -> dict:
    """One Ray job with ``actors`` CPU actors, in a fresh Ray instance of ``actors`` CPUs whose
    processes (raylet, actors) are pinned to ``actors`` cores of this machine."""
    import ray

    from teacher.cache import run_job

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < actors:
        raise SystemExit(f"bench/cache.py: {actors} actors need {actors} cores, this process may use {cores}")
    os.sched_setaffinity(0, cores[:actors])  # children (Ray's processes) inherit the mask
    try:
        ray.init(address="local", num_cpus=actors, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=False)
        try:
            threads = _probe_threads(ray)
            cfg = job_config(shards, ckpt, out, actors=actors, num_workers=0)
            s = run_job(cfg, progress=False)
        finally:
            ray.shutdown()
    finally:
        os.sched_setaffinity(0, cores)
    print(f"ray job, {actors} actor(s) on cores {cores[:actors]}: {s['steady_images_per_s']:.1f} img/s steady "
          f"(actor torch threads {threads['torch_threads']})", flush=True)
    return {"actors": actors, "cores": cores[:actors], "steady_images_per_s": s["steady_images_per_s"],
            "images_per_s_with_startup": s["images_per_s"], "startup_seconds": s["startup_seconds"],
            "calibration_seconds": s["calibration_seconds"], "actor_threads": threads}


def bench_ray(shards: str, ckpt: str, work: Path, repeats: int) -> dict:
    """1, 2, 1, 2, ..., 1 actors: each 2-actor run over the mean of the 1-actor runs around it."""
    import statistics

    runs = []
    for r in range(repeats):
        for actors in (1, 2):
            runs.append(ray_run(shards, ckpt, str(work / f"ray{actors}_{r}.zarr"), actors))
    runs.append(ray_run(shards, ckpt, str(work / f"ray1_{repeats}.zarr"), 1))
    one = [x for x in runs if x["actors"] == 1]
    two = [x for x in runs if x["actors"] == 2]
    ratios = [t["steady_images_per_s"] / statistics.mean([one[i]["steady_images_per_s"], one[i + 1]["steady_images_per_s"]])
              for i, t in enumerate(two)]
    with_startup = [t["images_per_s_with_startup"] / statistics.mean(
        [one[i]["images_per_s_with_startup"], one[i + 1]["images_per_s_with_startup"]]) for i, t in enumerate(two)]
    return {"ray_1_images_per_s": statistics.median(x["steady_images_per_s"] for x in one),
            "ray_2_images_per_s": statistics.median(x["steady_images_per_s"] for x in two),
            "ray_2_over_1": statistics.median(ratios), "ray_2_over_1_per_run": [round(x, 3) for x in ratios],
            "ray_2_over_1_with_startup": statistics.median(with_startup),
            "actor_torch_threads": sorted({x["actor_threads"]["torch_threads"] for x in runs}),
            "ray_runs": runs}


def stored_bytes(path: str) -> int:
    """Bytes on disk under a local cache directory (every Zarr chunk and metadata file)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="2-actor Ray runs (each between two 1-actor runs)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache.json"))
    args = p.parse_args(argv)
    from bench._env import provenance

    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_cache_"))
    shards, ckpt = make_inputs(work, args.samples)
    cfg = job_config(shards, ckpt, str(work / "item.zarr"))
    item = bench_item_vs_forward(cfg)
    reader = bench_reader(cfg.out)
    ray_res = bench_ray(shards, ckpt, work, args.repeats)
    result = {
        "teacher": "regnety_002 (random weights), 1000 classes, 224 px, fp32 on CPU",
        "data": f"Fashion-MNIST {args.samples} images, DeiT-B plan replayed at 224 px, k=10",
        **item, "reader_rows_per_s": reader,
        "stored_bytes_per_sample_epoch": stored_bytes(cfg.out) / (args.samples * cfg.epochs),
        **ray_res,
    }
    result["provenance"] = provenance()
    print(f"{'metric':<32} value")
    for k, v in result.items():
        if k not in ("ray_runs", "provenance"):
            print(f"{k:<32} {v:.3f}" if isinstance(v, float) else f"{k:<32} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
