"""Does the data path keep an accelerator busy? Replay speed, caching job and student, measured
against a simulated accelerator (``teacher/simulated.py``: a forward that sleeps batch / rate).

    python bench/accelerator.py            # ~10 min on 2 CPU cores; writes bench/results/accelerator.json

Data: ImageNet-like JPEG shards made from the real photos skimage and matplotlib ship offline
(``bench/photos.py``: each image a different random crop at an ImageNet-typical size such as
500x375, 375x500, 500x333, 500x500, random flip, JPEG q90), 224 px, the full DeiT-B plan (RRC, flip,
rand-m9-mstd0.5-inc1, erasing 0.25, Mixup 0.8 / CutMix 1.0), 3 views per sample.

Every figure is a ratio of things measured side by side in this run:

* ``replay_capacity_per_core``: images/s of one core running the caching job's replay
  (``pipeline.feed.ItemFeed`` without workers): each sample decoded once, 3 views
  (``sample_params`` + ``augment`` + ``finish``), mixed with its planned partner.
  ``timm_per_core``: one core decoding the same bytes once per view and running timm's
  ``create_transform`` with DeiT's arguments, as DeiT's repeated-augmentation loader does
  (its Mixup/CutMix runs batched on the GPU, so it is not counted). ``replay_over_timm`` =
  the ratio (goal >= 1.2), from interleaved rounds, CPU time of this single-threaded process.
* ``worker_capacity_per_core``: the same for the part of the replay the job's workers run
  (decode once + 3 x augment, ``pipeline.premix``); the rest (normalize, erase, mix) runs in the
  teacher's process, beside the simulated forward.
* ``workers_alone``: wall-clock images/s of the job's replay workers on their own (every item's
  pre-mix images, results drained), measured right before and after each job run, so the
  ratios below hold on a machine shared with other work (per-core rates above are CPU time).
* ``cache_eff_teacher_bound``: images/s of the caching job's per-actor loop (one persistent
  ``ItemFeed`` with ``--workers`` replay processes, ``run_item`` per item naming the next as
  prefetch, rows written to Zarr: what ``TeacherWorker.run`` does) over 8 items, counted from
  the end of the first item so every later item boundary is inside the figure, divided by the
  simulated teacher's rate, set to half the workers' capacity (``workers_alone``) (goal >= 0.9).
  ``cache_eff_cpu_bound``: the same images/s divided by the workers' capacity, with the teacher
  at twice it (goal >= 0.9); ``..._vs_cpu_time_capacity`` divides by ``--workers`` x
  ``worker_capacity_per_core`` instead (the same on a quiet machine). ``cluster_*``: the same
  with ``replay: ray`` (Ray tasks on ``--workers`` CPUs, results through the object store).
  ``ray_job_eff_teacher_bound``: ``pipeline.cache.run_job`` with one Ray actor, its steady
  rate (after actor start-up, the first item's fill included) over the teacher's rate.
* ``student_eff_step_bound`` / ``student_eff_cpu_bound``: a cached student
  (``student.train.train``, loss hard, ``--workers`` loader workers) whose model is the
  simulated accelerator (the step sleeps batch / rate). The loader's capacity is the student's
  images/s with a step 50x faster than the loader (``students.loader_alone``); the step is then
  set to half of it (images/s divided by the step rate) or to twice it (images/s divided by the
  loader's capacity). Images/s is read at the step (the simulated model's timeline, from the
  4th step of the epoch), so start-up and shutdown are left out.

On 2 cores: 1 replay worker, the other core for the teacher's (or student's) process.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.photos import imagenet_jpegs  # noqa: E402
from pipeline.job import CacheJobConfig  # noqa: E402
from pipeline.plan import AugConfig  # noqa: E402
from pipeline.premix import premix  # noqa: E402
from pipeline.shards import SourceSample, decode_image, load_manifest, read_shard, write_shards  # noqa: E402

VIEWS, OUT, CLASSES, BATCH = 3, 224, 1000, 64
SIMULATED = "teacher.simulated:sleeping_net"


def make_shards(work: Path, n: int, shard_size: int):
    labels = np.random.default_rng(1).integers(0, CLASSES, n)
    samples = [SourceSample(key=f"img{i:05d}", label=int(labels[i]), path=f"photo crop {i}", data=data)
               for i, data in enumerate(imagenet_jpegs(n))]
    return write_shards(samples, work / "ds", "train", [f"class_{c}" for c in range(CLASSES)], shard_size,
                        overwrite=True, source="bench/accelerator.py ImageNet-like photo crops")


def job_config(manifest, out: str, rate: float, **kw) -> CacheJobConfig:
    d = dict(shards=manifest.path, out=out, epochs=1, views=VIEWS, k=10, seed=0, batch_size=BATCH,
             num_workers=1, actors=1, max_retries=0,
             teacher=dict(callable=SIMULATED, num_classes=CLASSES, input_size=OUT, amp="none", channels_last=False,
                          model_kwargs={"images_per_s": rate, "num_classes": CLASSES}))
    d.update(kw)
    return CacheJobConfig.from_dict(d)


# --------------------------------------------------------------------------- replay vs timm, one core


def _cpu_rate(fn) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    n = fn()
    return n, n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def replay_images(cfg: CacheJobConfig, manifest, shard_samples: dict) -> int:
    """The job's whole replay of every item on one core (workers inline, in the feed's batcher
    thread): decode once, 3 views, finish, mix, batch."""
    from pipeline.pool import InlinePool
    from pipeline.work import ItemFeed

    feed = ItemFeed(cfg, manifest, OUT, pool=InlinePool(), read=lambda manifest, shard: shard_samples[shard.index])
    n = 0
    try:
        for s in manifest.shards:
            for batch in feed.batches(0, s.index, [], set()):
                n += len(batch.sample_id)
                feed.release(batch)
    finally:
        feed.close()
    return n


def worker_images(cfg: CacheJobConfig, manifest, shard_samples: dict) -> int:
    """The workers' part only: decode once + augment every view (pipeline.premix)."""
    n = 0
    for s in manifest.shards:
        n += sum(len(p.pixels) for p in premix(shard_samples[s.index], cfg.aug, cfg.seed, 0, VIEWS, OUT))
    return n


def timm_images(transform, manifest, shard_samples: dict) -> int:
    """DeiT's loader: every view decodes the file again and runs timm's transform."""
    n = 0
    for s in manifest.shards:
        for raw in shard_samples[s.index]:
            for _ in range(VIEWS):
                transform(decode_image(raw))
                n += 1
    return n


def timm_transform(aug: AugConfig):
    from timm.data import auto_augment as taa
    from timm.data import create_transform

    original = taa.posterize  # Pillow 13 rejects 0 bits (timm at magnitude 10): black image, as ours

    def posterize(img, bits_to_keep, **kw):
        return Image.new(img.mode, img.size, 0) if bits_to_keep <= 0 else original(img, bits_to_keep, **kw)

    for name, fn in list(taa.NAME_TO_OP.items()):
        if fn is original:
            taa.NAME_TO_OP[name] = posterize
    return create_transform(OUT, is_training=True, auto_augment=aug.auto_augment, interpolation=aug.interpolation,
                            re_prob=aug.re_prob, re_mode=aug.re_mode, re_count=1, mean=aug.mean, std=aug.std)


def bench_per_core(cfg, manifest, rounds: int) -> dict:
    torch.set_num_threads(1)
    samples = {s.index: read_shard(manifest, s) for s in manifest.shards}
    transform = timm_transform(cfg.aug)
    sides = {"replay": lambda: replay_images(cfg, manifest, samples),
             "timm": lambda: timm_images(transform, manifest, samples),
             "worker": lambda: worker_images(cfg, manifest, samples)}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    wall: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # ABBA: drift hits every side
            _, c, w = _cpu_rate(sides[name])
            cpu[name].append(c)
            wall[name].append(w)
        print(f"round {r}: " + "  ".join(f"{k} {cpu[k][-1]:6.1f}" for k in names) + " img/cpu-s", flush=True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "replay_capacity_per_core": round(med["replay"], 1),
        "timm_per_core": round(med["timm"], 1),
        "replay_over_timm": round(med["replay"] / med["timm"], 3),
        "replay_over_timm_per_round": [round(a / b, 3) for a, b in zip(cpu["replay"], cpu["timm"])],
        "worker_capacity_per_core": round(med["worker"], 1),
        "wall_replay_over_timm": round(statistics.median(wall["replay"]) / statistics.median(wall["timm"]), 3),
    }


# --------------------------------------------------------------------------- caching job


def workers_alone(cfg: CacheJobConfig, manifest, shard_samples: dict) -> float:
    """Wall-clock images/s of ``cfg``'s replay workers alone, now: every item's pre-mix images
    (decode once, augment 3 views), results drained in order, nothing finished or scored."""
    from pipeline.feed import GROUP_SAMPLES
    from pipeline.pool import make_pool

    pool = make_pool(cfg.replay, cfg.num_workers)
    try:
        t0 = time.perf_counter()
        tasks = [pool.submit(premix, group, cfg.aug, cfg.seed, 0, VIEWS, OUT)
                 for s in manifest.shards
                 for group in (shard_samples[s.index][i:i + GROUP_SAMPLES]
                               for i in range(0, s.count, GROUP_SAMPLES))]
        n = sum(len(p.pixels) for task in tasks for p in task.result())
        return n / (time.perf_counter() - t0)
    finally:
        pool.close()


def bench_items(manifest, work: Path, name: str, rate: float, **kw) -> dict:
    """The teacher actor's loop, in this process: one persistent feed (replay workers started
    once), ``run_item`` per item naming the next one as ``prefetch``, rows written to Zarr.
    Images/s counts from the end of the first item (the pipeline fill, like actor start-up,
    is paid once per actor), so the 7+ item boundaries after it are all inside the figure."""
    from pipeline.feed import ItemFeed
    from pipeline.job import cache_attrs, make_teacher, open_writer
    from pipeline.work import run_item

    cfg = job_config(manifest, str(work / f"{name}.zarr"), rate, **kw)
    feed = ItemFeed(cfg, manifest, OUT)
    teacher, writer = make_teacher(cfg), open_writer(cfg, manifest, cache_attrs(cfg, manifest))
    items = [(0, s.index) for s in manifest.shards]
    ends, images, waits = [], [], []
    t0 = time.perf_counter()
    try:
        for i, item in enumerate(items):
            res = run_item(cfg, *item, teacher=teacher, writer=writer, manifest=manifest, feed=feed,
                           prefetch=items[i + 1] if i + 1 < len(items) else None)
            ends.append(time.perf_counter())
            images.append(res.images)
            waits.append(round(res.wait_seconds, 3))
    finally:
        feed.close()
    steady = sum(images[1:]) / (ends[-1] - ends[0])
    print(f"{name}: teacher {rate:.0f} img/s -> {steady:.1f} img/s over items 2..{len(items)} "
          f"(teacher waited {sum(waits[1:]):.2f} s of {ends[-1] - ends[0]:.1f} s)", flush=True)
    return {"teacher_images_per_s": round(rate, 1), "images_per_s": round(steady, 1),
            "images_per_s_with_first_item": round(sum(images) / (ends[-1] - t0), 1), "items": len(items),
            "images": sum(images), "teacher_wait_s_per_item": waits, "cache": cfg.out}


def bench_ray_job(manifest, work: Path, rate: float, workers: int) -> dict:
    """The same through ``pipeline.cache.run_job``: one Ray actor (steady = after actor start-up)."""
    from pipeline.cache import run_job

    cfg = job_config(manifest, str(work / "ray_job.zarr"), rate, num_workers=workers)
    s = run_job(cfg, progress=False)
    print(f"run_job: teacher {rate:.0f} img/s -> {s['steady_images_per_s']:.1f} img/s after actor start-up "
          f"({s['startup_seconds']:.1f} s)", flush=True)
    return {"teacher_images_per_s": round(rate, 1), "steady_images_per_s": s["steady_images_per_s"],
            "startup_seconds": s["startup_seconds"], "items": s["items_run"]}


# --------------------------------------------------------------------------- student


def student_rate(cache: str, manifest, work: Path, rate: float, workers: int) -> dict:
    """Images/s of a cached student whose step sleeps batch / rate (``student.train.train``, one
    epoch): read at the step, from the simulated model's timeline, after its first 3 steps."""
    from pipeline.config import load_config
    from student.config import TrainConfig
    from student.train import train
    from teacher.simulated import steady_rate

    fd, name = tempfile.mkstemp(dir=work, prefix=f"student_{rate:.0f}_", suffix=".timeline")
    os.close(fd)
    timeline = Path(name)
    cfg = load_config(TrainConfig, None, [
        f"data.train={manifest.path}", f"cache.path={cache}", "loss.mode=hard", "teacher.mode=cached",
        f"model.name={SIMULATED}", f"model.model_kwargs={{images_per_s: {rate}, timeline: '{timeline}'}}",
        f"data.batch_size={BATCH}", f"data.num_workers={workers}", "run.epochs=1", "run.device=cpu",
        "run.threads=1", "run.progress=false", "run.plot=false", "run.log_every=0",
        f"run.out={timeline.with_suffix('')}", "optim.warmup_epochs=0"])
    train(cfg)
    got = steady_rate(str(timeline), skip=3)
    steps = len(timeline.read_text().splitlines())
    print(f"student: step {rate:.0f} img/s -> {got:.1f} img/s over steps 4..{steps}", flush=True)
    return {"step_images_per_s": round(rate, 1), "images_per_s": round(got, 1), "steps": steps}


def machine() -> dict:
    import PIL
    import timm

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__, "load_average_at_end": list(os.getloadavg())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="distinct JPEGs (shards of --shard-size)")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="interleaved per-core rounds (each: every shard)")
    p.add_argument("--workers", type=int, default=1, help="replay workers (caching job and student)")
    p.add_argument("--repeats", type=int, default=2, help="job and student runs per setting (median reported)")
    p.add_argument("--skip-student", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "accelerator.json"))
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_accel_"))
    manifest = make_shards(work, args.images, args.shard_size)
    sizes = {}
    for s in manifest.shards:
        for raw in read_shard(manifest, s):
            with Image.open(io.BytesIO(raw.data)) as im:
                sizes[f"{im.size[0]}x{im.size[1]}"] = sizes.get(f"{im.size[0]}x{im.size[1]}", 0) + 1
    base = job_config(manifest, str(work / "unused.zarr"), 1.0)
    result = {"command": "python bench/accelerator.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "data": {"images": manifest.num_samples, "shards": len(manifest.shards), "shard_size": args.shard_size,
                       "jpeg_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
                       "bytes_per_image": round(sum(s.bytes for s in manifest.shards) / manifest.num_samples)},
              "views": VIEWS, "out_size": OUT, "batch_size": BATCH, "workers": args.workers}
    result.update(bench_per_core(base, manifest, args.rounds))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
    cpu_time_capacity = result["worker_capacity_per_core"] * args.workers
    samples = {s.index: read_shard(manifest, s) for s in manifest.shards}

    import ray

    jobs, caps = {}, {}
    for place in ("local", "ray"):
        if place == "ray":  # replay as Ray tasks on `workers` CPUs; the teacher loop stays here
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        kw = {"num_workers": args.workers} if place == "local" else {"replay": "ray", "num_workers": args.workers + 1}
        cfg = base.replace(**kw)
        try:
            # capacity, job, capacity, job, ...: each job is compared with the capacity around it
            alone = [workers_alone(cfg, manifest, samples)]
            teacher_bound, cpu_bound = [], []
            for r in range(args.repeats):
                teacher_bound.append(bench_items(manifest, work, f"{place}_teacher_bound{r}", alone[-1] / 2, **kw))
                alone.append(workers_alone(cfg, manifest, samples))
                cpu_bound.append(bench_items(manifest, work, f"{place}_cpu_bound{r}", alone[-1] * 2, **kw))
                alone.append(workers_alone(cfg, manifest, samples))
        finally:
            if place == "ray":
                ray.shutdown()
        caps[place] = [round(a, 1) for a in alone]
        jobs[f"{place}_teacher_bound"], jobs[f"{place}_cpu_bound"] = teacher_bound, cpu_bound
        prefix = "cache" if place == "local" else "cluster"
        result[f"{prefix}_eff_teacher_bound"] = round(statistics.median(
            j["images_per_s"] / j["teacher_images_per_s"] for j in teacher_bound), 3)
        result[f"{prefix}_eff_cpu_bound"] = round(statistics.median(
            j["images_per_s"] / statistics.mean(alone[2 * r + 1:2 * r + 3]) for r, j in enumerate(cpu_bound)), 3)
    result["workers_alone_images_per_s"] = caps
    result["cache_eff_cpu_bound_vs_cpu_time_capacity"] = round(statistics.median(
        j["images_per_s"] for j in jobs["local_cpu_bound"]) / cpu_time_capacity, 3)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        jobs["ray_job_teacher_bound"] = bench_ray_job(manifest, work, caps["local"][-1] / 2, args.workers)
    finally:
        ray.shutdown()
    result["jobs"] = jobs
    result["ray_job_eff_teacher_bound"] = round(jobs["ray_job_teacher_bound"]["steady_images_per_s"]
                                                / jobs["ray_job_teacher_bound"]["teacher_images_per_s"], 3)

    if not args.skip_student:
        cache = jobs["local_cpu_bound"][0]["cache"]
        cpu_capacity = result["replay_capacity_per_core"] * args.workers
        # the loader with a step 50x faster than it: its own rate, now (what the step must not slow)
        # the loader with a step 50x faster than it: its own rate, now (what the step must not slow)
        alone = [student_rate(cache, manifest, work, 50 * cpu_capacity, args.workers)]
        step_bound, cpu_bound = [], []
        for _ in range(args.repeats):
            step_bound.append(student_rate(cache, manifest, work, alone[-1]["images_per_s"] / 2, args.workers))
            alone.append(student_rate(cache, manifest, work, 50 * cpu_capacity, args.workers))
            cpu_bound.append(student_rate(cache, manifest, work, alone[-1]["images_per_s"] * 2, args.workers))
            alone.append(student_rate(cache, manifest, work, 50 * cpu_capacity, args.workers))
        loader = [a["images_per_s"] for a in alone]
        result["students"] = {"loader_alone": alone, "step_bound": step_bound, "cpu_bound": cpu_bound}
        result["student_eff_step_bound"] = round(statistics.median(
            j["images_per_s"] / j["step_images_per_s"] for j in step_bound), 3)
        result["student_eff_cpu_bound"] = round(statistics.median(
            j["images_per_s"] / statistics.mean(loader[2 * r + 1:2 * r + 3]) for r, j in enumerate(cpu_bound)), 3)
        result["student_eff_cpu_bound_vs_cpu_time_capacity"] = round(statistics.median(
            j["images_per_s"] for j in cpu_bound) / cpu_capacity, 3)
    # capacity again, to show how much the machine's load moved during the run
    torch.set_num_threads(1)
    after = bench_per_core(base, manifest, 1)
    result["worker_capacity_per_core_at_end"] = after["worker_capacity_per_core"]
    result["replay_capacity_per_core_at_end"] = after["replay_capacity_per_core"]
    result["machine"] = machine()

    print()
    print(f"{'metric':<44}{'value':>10}  goal")
    for key, goal in (("replay_capacity_per_core", ""), ("timm_per_core", ""), ("replay_over_timm", ">= 1.2"),
                      ("worker_capacity_per_core", ""), ("cache_eff_teacher_bound", ">= 0.9"),
                      ("cache_eff_cpu_bound_vs_cpu_time_capacity", ""),
                      ("cache_eff_cpu_bound", ">= 0.9"), ("cluster_eff_teacher_bound", ""),
                      ("cluster_eff_cpu_bound", ""), ("ray_job_eff_teacher_bound", ""),
                      ("student_eff_step_bound", ">= 0.9"),
                      ("student_eff_cpu_bound", ">= 0.9"), ("student_eff_cpu_bound_vs_cpu_time_capacity", "")):
        if key in result:
            print(f"{key:<44}{result[key]:>10}  {goal}")
    write_result(args.out, result)
    return 0


def write_result(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
