"""Caching-job benchmark: caching vs bare teacher forward, reader rows/s, 1 vs 2 Ray workers.

    python bench/cache.py [--samples 1024] [--out bench/results/cache.json]   # ~3 min on 2 CPU cores

Teacher: timm ``regnety_002`` (random weights, fixed seed; 1000 classes; 224 px; fp32 on CPU,
bf16 autocast on CUDA) over Fashion-MNIST images (PNG 28 px, replayed with the full DeiT-B plan
at 224 px: RRC, flip, RandAugment, erasing, mixup/cutmix), 1 epoch x 1 view, k = 10.
At 224 px the forward dominates on CPU, as RegNetY-16GF's does on a GPU.

* ``cache_over_forward``: images/s of :func:`pipeline.work.run_item` (read shard, replay in
  1 decode process, score, write) ÷ images/s of ``Teacher.forward_logits`` alone on the
  same device and batch size, measured side by side in this run. On CPU the teacher gets
  ``cpu_count - num_workers`` threads in BOTH measurements, so the decode process has a core
  of its own — as on a GPU node, where decoding runs on CPU cores beside the GPU. The question
  measured is whether reading, replaying and writing hide behind the forward.
* ``reader_rows_per_s``: ``CacheReader.lookup`` of random batches of 256 rows (one epoch).
* ``ray_2_over_1``: steady images/s (after actor start-up and the tail calibration) of the same
  Ray job with 2 vs 1 CPU actor (fresh caches); the rates including both are reported beside it.
* ``calibration_seconds``: the learned tail's calibration (the teacher's full logits of the first
  ``tail.calibration_rows`` rows, then the fit), paid once per cache before any item; it is
  timed apart from the item rate.
* ``bytes_per_sample_epoch_k10``: bytes per cached row (one sample, one view, one epoch) at k = 10
  with the default learned tail, measured here in the storage format of this commit
  (``format_version``): bench/realrows.py's real EfficientNet-Lite0 eval rows written through
  ``storage`` and read back, as bench/storage.py does (its k = 10 row). This bench's own teacher
  has random weights, whose rows compress unlike a real teacher's. It used to be copied from
  bench/results/storage.json, which could predate the format (it did: format 3).
  ``--only-bytes`` remeasures just this figure in an existing JSON (~1 min once the rows are
  cached; the other figures keep their commit, ``commit``).
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
sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/storage.py must not shadow storage/
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from realrows import VIEWS, provenance, teacher_rows, write_cache  # noqa: E402

TEACHER = dict(name="regnety_002", num_classes=1000, input_size=224, amp="auto", channels_last=True)


def make_inputs(work: Path, samples: int, shard_size: int = 256) -> tuple[str, str]:
    import torch

    from pipeline.make_shards import fmnist_samples, load_fmnist
    from pipeline.shards import write_shards
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
    from pipeline.cache import CacheJobConfig

    d = dict(shards=shards, out=out, epochs=1, views=1, k=10, batch_size=64, num_workers=1, actors=1,
             teacher={**TEACHER, "checkpoint": ckpt})
    d.update(kw)
    return CacheJobConfig.from_dict(d)


def bench_item_vs_forward(cfg) -> dict:
    """run_item images/s and bare-forward images/s, same device/batch, one process."""
    import torch

    from pipeline.cache import cache_attrs, make_teacher, open_writer
    from pipeline.calibrate import calibrate_tail
    from pipeline.shards import load_manifest
    from pipeline.work import run_item

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
    r.lookup(0, np.arange(min(n, batch)), np.zeros(min(n, batch), np.int64))  # warm chunk cache
    rows, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ids = rng.integers(0, n, batch)
        r.lookup(0, ids, rng.integers(0, r.views, batch))
        rows += batch
    return rows / (time.perf_counter() - t0)


def bench_ray(shards: str, ckpt: str, work: Path) -> dict:
    import ray

    from pipeline.cache import run_job

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    try:
        rates = {}
        for actors in (1, 2):
            cfg = job_config(shards, ckpt, str(work / f"ray{actors}.zarr"), actors=actors, num_workers=0)
            rates[actors] = run_job(cfg, progress=False)
    finally:
        ray.shutdown()
    one, two = rates[1], rates[2]
    return {"ray_1_images_per_s": one["steady_images_per_s"], "ray_2_images_per_s": two["steady_images_per_s"],
            "ray_2_over_1": two["steady_images_per_s"] / one["steady_images_per_s"],
            "ray_1_images_per_s_with_startup": one["images_per_s"],
            "ray_2_images_per_s_with_startup": two["images_per_s"],
            "ray_2_over_1_with_startup": two["images_per_s"] / one["images_per_s"],
            "actor_startup_seconds": [one["startup_seconds"], two["startup_seconds"]],
            "ray_calibration_seconds": [one["calibration_seconds"], two["calibration_seconds"]]}


def bytes_per_row_k10() -> dict:
    """Bytes per row at k = 10, default learned tail, in the current storage format (see module doc)."""
    import torch

    from teacher.tail import TailConfig, TailModel

    data = teacher_rows(2500)  # bench/storage.py's rows (cached in the temp dir)
    logits = torch.from_numpy(data["logits"])
    fit, ev = logits[data["split"] == 0], logits[data["split"] == 1]
    ev = ev[: len(ev) // VIEWS * VIEWS]
    tail_cfg = TailConfig()
    tail = TailModel.fit(fit.numpy(), tail_cfg.dim, tail_cfg.step)
    with tempfile.TemporaryDirectory() as tmp:
        _, per_row, _, _ = write_cache(Path(tmp) / "k10.zarr", ev, 10, tail)
    prov = provenance()
    return {"bytes_per_sample_epoch_k10": round(per_row, 3),
            "bytes_per_sample_epoch_k10_source": (
                f"measured here: {len(ev)} real EfficientNet-Lite0 rows (bench/realrows.py eval half), k=10, "
                f"learned tail dim {tail_cfg.dim} step {tail_cfg.step}, storage format {prov['format_version']}"),
            "bytes_per_sample_epoch_k10_commit": prov["commit"], "format_version": prov["format_version"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cache.json"))
    p.add_argument("--only-bytes", action="store_true",
                   help="remeasure only bytes_per_sample_epoch_k10 and update it in the existing --out")
    args = p.parse_args(argv)
    if args.only_bytes:
        result = {**json.loads(Path(args.out).read_text()), **bytes_per_row_k10()}
        print(f"bytes_per_sample_epoch_k10 {result['bytes_per_sample_epoch_k10']} "
              f"({result['bytes_per_sample_epoch_k10_source']})")
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_cache_"))
    shards, ckpt = make_inputs(work, args.samples)
    cfg = job_config(shards, ckpt, str(work / "item.zarr"))
    item = bench_item_vs_forward(cfg)
    reader = bench_reader(cfg.out)
    ray_res = bench_ray(shards, ckpt, work)
    result = {
        "teacher": "regnety_002 (random weights), 1000 classes, 224 px, fp32 on CPU",
        "data": f"Fashion-MNIST {args.samples} images, DeiT-B plan replayed at 224 px, k=10",
        "commit": provenance()["commit"],
        **bytes_per_row_k10(),
        **item, "reader_rows_per_s": reader, **ray_res,
        "cpu_count": os.cpu_count(),
    }
    print(f"{'metric':<32} value")
    for k, v in result.items():
        print(f"{k:<32} {v:.3f}" if isinstance(v, float) else f"{k:<32} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
