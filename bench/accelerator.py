"""Does the data path keep an accelerator busy? Replay speed, caching job and student, measured
against a simulated accelerator (``bench/simulated.py``: a forward that sleeps batch / rate).

    python bench/accelerator.py            # ~15 min on 2 CPU cores; writes bench/results/accelerator.json
    python bench/accelerator.py --skip-cache --out /tmp/student.json   # the student part only

Data: ImageNet-like JPEG shards made from the real photos skimage and matplotlib ship offline
(``bench/photos.py``: each image a different random crop at an ImageNet-typical size such as
500x375, 375x500, 500x333, 500x500, random flip, JPEG q90), 224 px, the full DeiT-B plan (RRC, flip,
rand-m9-mstd0.5-inc1, erasing 0.25, Mixup 0.8 / CutMix 1.0), 3 views per sample.

Every figure is a ratio of things measured side by side in this run:

* ``replay_capacity_per_core``: images/s of one core running the caching job's replay
  (``teacher.feed.ItemFeed`` without workers): each sample decoded once, 3 views
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
  ``ray_job_eff_teacher_bound``: ``teacher.cache.run_job`` with one Ray actor, its steady
  rate (after actor start-up, the first item's fill included) over the teacher's rate.
* Student (``student.train.train``, loss hard, ``--workers`` loader workers, the loader's ordering
  settings at their defaults) whose model is the simulated accelerator (the step sleeps
  batch / rate), on its own data: the JPEGs above ``--student-copies`` times over, each copy a
  sample of its own (key, label, augmentation), cached once, so an epoch (4096 rows, 64 steps
  by default) is far longer than anything the loader holds ahead. Images/s is read at the step
  (the simulated model's timeline) over the steps after the loader's held items are full and
  before the end, where held items empty without new replays (:func:`window`: an item-level
  shuffle buffer of ``data.shuffle_buffer`` items per worker, where the loader has one, plus the
  DataLoader's prefetch; at least 3 steps each side); at least ``--min-steps`` steps are timed,
  else the script stops. (Before issue 17 this timed steps 4..8 of a 512-row epoch that the
  512-item buffer had replayed before step 1: 942-1376 img/s from one 321 img/s core.)

  ``student_replay_per_core``: rows per CPU-second of the same loader with no worker process
  (one core, a whole epoch, so every replayed row is counted), before and after the student
  runs. ``student_loader_images_per_s`` (``students.loader_alone``): the student with a step 50x
  faster than that; ``student_eff_step_bound``: the step at half the loader's rate, images/s over
  the step's rate; ``student_eff_cpu_bound``: the step at twice it, images/s over the loader's
  rate around it; ``..._vs_cpu_time_capacity``: over ``--workers`` x the per-core rate (<= 1 on
  any machine). ``student_first_batch_s``: seconds from asking ``TrainData.batches`` for epoch 0
  to its first batch (loader workers start, read, replay what the loader holds, cache join);
  median of 3.

Physical plausibility (:func:`plausibility`): every measured rate is checked against what its
workers can do: a caching job's img/s <= workers x ``worker_capacity_per_core`` x 1.25, a
student's <= workers x the student replay per core x 1.25, and none above its simulated
accelerator's rate. A failed check sets the figures built on it to None (the measurement and
the reason under ``invalid``), prints them to stderr and the script exits 3.

``provenance`` (bench/_env.py): commit, machine (CPU model, cores, load average when written),
package versions. ``--skip-cache`` measures only the student part (a few minutes).

On 2 cores: 1 replay worker, the other core for the teacher's (or student's) process.
"""
from __future__ import annotations

import argparse
import io
import json
import os
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
from teacher.job import CacheJobConfig  # noqa: E402
from pipeline.plan import AugConfig  # noqa: E402
from pipeline.premix import premix  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.shards import read_shard  # noqa: E402
from pipeline.writer import SourceSample, write_shards  # noqa: E402

VIEWS, OUT, CLASSES, BATCH = 3, 224, 1000, 64
SIMULATED = "bench.simulated:sleeping_net"


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
    from teacher.pool import InlinePool
    from teacher.feed import ItemFeed

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
    from teacher.feed import GROUP_SAMPLES
    from teacher.pool import make_pool

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
    from teacher.feed import ItemFeed
    from teacher.job import cache_attrs, make_teacher, open_writer
    from teacher.work import run_item

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
    """The same through ``teacher.cache.run_job``: one Ray actor (steady = after actor start-up)."""
    from teacher.cache import run_job

    cfg = job_config(manifest, str(work / "ray_job.zarr"), rate, num_workers=workers)
    s = run_job(cfg, progress=False)
    print(f"run_job: teacher {rate:.0f} img/s -> {s['steady_images_per_s']:.1f} img/s after actor start-up "
          f"({s['startup_seconds']:.1f} s)", flush=True)
    return {"teacher_images_per_s": round(rate, 1), "steady_images_per_s": s["steady_images_per_s"],
            "startup_seconds": s["startup_seconds"], "items": s["items_run"]}


# --------------------------------------------------------------------------- student


def student_manifest(work: Path, manifest, copies: int, shard_size: int):
    """The student's data: the caching part's JPEGs ``copies`` times over, each copy a sample of
    its own (own key, label and augmentation; decoded and replayed like a distinct photo), so
    an epoch is far longer than anything the loader holds ahead."""
    src = [raw for s in manifest.shards for raw in read_shard(manifest, s)]
    labels = np.random.default_rng(2).integers(0, CLASSES, len(src) * copies)
    samples = [SourceSample(key=f"s{c}_{raw.key}", label=int(labels[c * len(src) + i]), path=f"copy {c} of {raw.key}",
                            data=raw.data) for c in range(copies) for i, raw in enumerate(src)]
    return write_shards(samples, work / "student_ds", "train", [f"class_{c}" for c in range(CLASSES)], shard_size,
                        overwrite=True, source="bench/accelerator.py student data (photo crops, copies)")


def student_config(cache: str, manifest, timeline: Path, rate: float, workers: int, extra=()):
    """``student.train``'s config: loss hard, the simulated accelerator as the model, one epoch.
    The loader's ordering settings stay at their defaults (what a user's run gets)."""
    from pipeline.config import load_config
    from student.config import TrainConfig

    return load_config(TrainConfig, None, [
        f"data.train={manifest.path}", f"cache.path={cache}", "loss.mode=hard", "teacher.mode=cached",
        f"model.name={SIMULATED}", f"model.model_kwargs={{images_per_s: {rate}, timeline: '{timeline}'}}",
        f"data.batch_size={BATCH}", f"data.num_workers={workers}", "run.epochs=1", "run.device=cpu",
        "run.threads=1", "run.progress=false", "run.plot=false", "run.log_every=0",
        f"run.out={timeline.with_suffix('')}", "optim.warmup_epochs=0", *extra])


def held_items(workers: int) -> int:
    """Replayed items the student loader may hold before it hands over a batch: an item-level
    shuffle buffer (``data.shuffle_buffer`` items per worker) where the loader has one, plus
    the DataLoader's prefetch (2 chunks per worker, a batch's worth per worker here). A loader
    without an item buffer (index-level shuffle) holds only the prefetch."""
    from student.config import DataConfig

    buffer = getattr(DataConfig(), "shuffle_buffer", 0) or 0
    return max(1, workers) * (buffer if buffer > 1 else 0) + 2 * max(1, workers) * BATCH


def window(steps: int, workers: int, min_steps: int, skip: int | None = None) -> tuple[int, int]:
    """The steps [first, last] timed: after the loader's held items are full (so each step
    waits for new replays, not for ones made before step 1) and before the end, where a buffer
    empties without replaying; the first 3 steps are left out in any case (start-up)."""
    lead = max(3, -(-held_items(workers) // BATCH) + 1) if skip is None else skip
    first, last = lead, steps - 1 - lead
    if last - first < min_steps:
        raise SystemExit(f"bench/accelerator.py: a student epoch of {steps} steps leaves {max(0, last - first)} "
                         f"steps between its first {lead} (the loader's held items fill) and its last {lead} "
                         f"(they empty), fewer than --min-steps {min_steps}: raise --student-copies")
    return first, last


def window_rate(timeline: Path, first: int, last: int) -> float:
    """Images/s between the starts of forwards ``first`` and ``last`` (the simulated model's timeline)."""
    rows = [line.split() for line in timeline.read_text().splitlines()]
    times, sizes = [float(t) for t, _ in rows], [int(n) for _, n in rows]
    return sum(sizes[first:last]) / (times[last] - times[first])


def student_rate(cache: str, manifest, work: Path, rate: float, workers: int, min_steps: int,
                 skip: int | None) -> dict:
    """Images/s of a cached student whose step sleeps batch / rate (``student.train.train``, one
    epoch), read at the step (the simulated model's timeline) over :func:`window`'s steps."""
    from student.train import train

    fd, name = tempfile.mkstemp(dir=work, prefix=f"student_{rate:.0f}_", suffix=".timeline")
    os.close(fd)
    timeline = Path(name)
    train(student_config(cache, manifest, timeline, rate, workers))
    steps = len(timeline.read_text().splitlines())
    first, last = window(steps, workers, min_steps, skip)
    got = window_rate(timeline, first, last)
    print(f"student: step {rate:.0f} img/s -> {got:.1f} img/s over steps {first + 1}..{last + 1} of {steps}", flush=True)
    return {"step_images_per_s": round(rate, 1), "images_per_s": round(got, 1), "steps": steps,
            "timed_steps": [first + 1, last + 1]}


def train_data(cache: str, manifest, work: Path, workers: int):
    """``student.data.TrainData`` of the run :func:`student_rate` makes (rank 0 of 1)."""
    from student.data import TrainData, open_checked_cache

    cfg = student_config(cache, manifest, work / "unused.timeline", 1.0, workers)
    reader, plan = open_checked_cache(cfg, manifest)
    return TrainData(cfg, manifest, plan, reader, log=lambda *_: None)


def student_replay_per_core(cache: str, manifest, work: Path) -> dict:
    """Rows per CPU-second of the student loader's replay on one core: epoch 0's loader with no
    worker processes (read, replay, shuffle, collate in this single-threaded process), every
    row of the epoch, so everything replayed is counted (a held buffer included)."""
    torch.set_num_threads(1)
    loader = train_data(cache, manifest, work, 0).loader(0)
    wall, cpu = time.perf_counter(), time.process_time()
    rows = sum(len(b["label"]) for b in loader)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"student replay, one core: {rows / cpu:.1f} rows/cpu-s ({rows} rows)", flush=True)
    return {"rows": rows, "rows_per_cpu_s": round(rows / cpu, 1), "rows_per_wall_s": round(rows / wall, 1)}


def first_batch_delay(cache: str, manifest, work: Path, workers: int) -> float:
    """Seconds from asking for epoch 0's batches (``TrainData.batches``: loader workers start,
    shards are read, rows replayed, the cache joined) to the first batch in hand."""
    data = train_data(cache, manifest, work, workers)
    t0 = time.perf_counter()
    batches = data.batches(0)
    next(batches)
    delay = time.perf_counter() - t0
    batches.close()  # stops the loader's workers
    return delay


def bench_student(args, manifest, work: Path, result: dict) -> None:
    """The student figures into ``result`` (see the module docstring)."""
    smanifest = student_manifest(work, manifest, args.student_copies, args.shard_size)
    # its cache: the caching job with a teacher far faster than the replay
    cache = bench_items(smanifest, work, "student_cache", 1e6, num_workers=args.workers)["cache"]
    per_core = [student_replay_per_core(cache, smanifest, work)]
    torch.set_num_threads(1)
    delays = [first_batch_delay(cache, smanifest, work, args.workers) for _ in range(3)]
    print(f"student first batch after {statistics.median(delays):.2f} s (median of {delays})", flush=True)
    cap = per_core[0]["rows_per_cpu_s"] * args.workers
    run = lambda rate: student_rate(cache, smanifest, work, rate, args.workers, args.min_steps, args.skip_steps)  # noqa: E731
    # the loader with a step 50x faster than it: its own rate, now (what the step must not slow)
    alone = [run(50 * cap)]
    step_bound, cpu_bound = [], []
    for _ in range(args.repeats):
        step_bound.append(run(alone[-1]["images_per_s"] / 2))
        alone.append(run(50 * cap))
        cpu_bound.append(run(alone[-1]["images_per_s"] * 2))
        alone.append(run(50 * cap))
    per_core.append(student_replay_per_core(cache, smanifest, work))
    loader = [a["images_per_s"] for a in alone]
    capacity = statistics.mean(c["rows_per_cpu_s"] for c in per_core) * args.workers
    result["student_data"] = {"images": smanifest.num_samples, "copies_of_each_jpeg": args.student_copies,
                              "steps_per_epoch": alone[0]["steps"], "held_items_before_a_batch": held_items(args.workers)}
    result["student_replay_per_core"] = per_core
    result["student_first_batch_s"] = round(statistics.median(delays), 3)
    result["student_first_batch_s_runs"] = [round(d, 3) for d in delays]
    result["students"] = {"loader_alone": alone, "step_bound": step_bound, "cpu_bound": cpu_bound}
    result["student_loader_images_per_s"] = round(statistics.median(loader), 1)
    result["student_eff_step_bound"] = round(statistics.median(
        j["images_per_s"] / j["step_images_per_s"] for j in step_bound), 3)
    result["student_eff_cpu_bound"] = round(statistics.median(
        j["images_per_s"] / statistics.mean(loader[2 * r + 1:2 * r + 3]) for r, j in enumerate(cpu_bound)), 3)
    result["student_eff_cpu_bound_vs_cpu_time_capacity"] = round(statistics.median(
        j["images_per_s"] for j in cpu_bound) / capacity, 3)
    result["student_loader_vs_cpu_time_capacity"] = round(statistics.median(loader) / capacity, 3)


# --------------------------------------------------------------------------- physical plausibility

# A wall-clock rate of W worker processes cannot beat W x one core's rate (CPU time, measured in
# this run) by more than this: the per-core figure also carries work the workers leave to the
# main process (batch assembly), and a core's speed varies a little with what runs beside it.
MARGIN = 1.25


def plausibility(result: dict, workers: int) -> list[dict]:
    """Every measured rate against its physical bound; a violated one marks the figures built
    on it invalid (set to None, the reason under ``invalid``)."""
    checks = []

    def check(what: str, measured: float, bound: float, basis: str, figures: tuple[str, ...]):
        checks.append({"what": what, "measured": measured, "bound": round(bound, 1), "basis": basis,
                       "ok": measured <= bound, "figures": list(figures)})

    worker_cap = workers * result.get("worker_capacity_per_core", 0) * MARGIN
    for place, prefix in (("local", "cache"), ("ray", "cluster")):
        for kind in ("teacher_bound", "cpu_bound"):
            for j in result.get("jobs", {}).get(f"{place}_{kind}", []):
                check(f"caching job ({place} replay, {kind}) img/s", j["images_per_s"], worker_cap,
                      f"{workers} worker(s) x worker_capacity_per_core x {MARGIN}",
                      (f"{prefix}_eff_{kind}",) + (("cache_eff_cpu_bound_vs_cpu_time_capacity",)
                                                   if (place, kind) == ("local", "cpu_bound") else ()))
                if kind == "teacher_bound":
                    check(f"caching job ({place} replay, teacher-bound) img/s", j["images_per_s"],
                          j["teacher_images_per_s"] * 1.02, "the simulated teacher's rate (it sleeps)",
                          (f"{prefix}_eff_teacher_bound",))
    if "students" in result:
        per_core = max(c["rows_per_cpu_s"] for c in result["student_replay_per_core"])
        cap = workers * per_core * MARGIN
        names = {"loader_alone": ("student_eff_cpu_bound", "student_loader_images_per_s",
                                  "student_loader_vs_cpu_time_capacity"),
                 "step_bound": ("student_eff_step_bound",),
                 "cpu_bound": ("student_eff_cpu_bound", "student_eff_cpu_bound_vs_cpu_time_capacity")}
        for kind, runs in result["students"].items():
            for j in runs:
                check(f"student ({kind}) img/s", j["images_per_s"], cap,
                      f"{workers} loader worker(s) x student replay rows/cpu-s on one core x {MARGIN}", names[kind])
                check(f"student ({kind}) img/s", j["images_per_s"], j["step_images_per_s"] * 1.02,
                      "the simulated step's rate (it sleeps)", names[kind])
    return checks


def mark_invalid(result: dict, checks: list[dict]) -> list[dict]:
    """Set the figures of every failed check to None and say why under ``result["invalid"]``."""
    failed = [c for c in checks if not c["ok"]]
    result["invalid"] = {}
    for c in failed:
        for key in c["figures"]:
            if key in result:
                result["invalid"].setdefault(key, {"value": result[key], "reasons": []})
                result["invalid"][key]["reasons"].append(
                    f"{c['what']} {c['measured']} > {c['bound']} ({c['basis']})")
                result[key] = None
    result["plausibility"] = checks
    result["valid"] = not failed
    return failed


def bench_cache(args, manifest, work: Path, base: CacheJobConfig, result: dict) -> None:
    """The per-core comparison and the caching job's figures into ``result``."""
    import ray

    result.update(bench_per_core(base, manifest, args.rounds))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
    cpu_time_capacity = result["worker_capacity_per_core"] * args.workers
    samples = {s.index: read_shard(manifest, s) for s in manifest.shards}
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


TABLE = (("replay_capacity_per_core", ""), ("timm_per_core", ""), ("replay_over_timm", ">= 1.2"),
         ("worker_capacity_per_core", ""), ("cache_eff_teacher_bound", ">= 0.9"),
         ("cache_eff_cpu_bound_vs_cpu_time_capacity", ""), ("cache_eff_cpu_bound", ">= 0.9"),
         ("cluster_eff_teacher_bound", ""), ("cluster_eff_cpu_bound", ""), ("ray_job_eff_teacher_bound", ""),
         ("student_first_batch_s", ""), ("student_loader_images_per_s", ""),
         ("student_loader_vs_cpu_time_capacity", "<= 1"), ("student_eff_step_bound", ">= 0.9"),
         ("student_eff_cpu_bound", ">= 0.9"), ("student_eff_cpu_bound_vs_cpu_time_capacity", "<= 1"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="distinct JPEGs (shards of --shard-size)")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="interleaved per-core rounds (each: every shard)")
    p.add_argument("--workers", type=int, default=1, help="replay workers (caching job and student)")
    p.add_argument("--repeats", type=int, default=2, help="job and student runs per setting (median reported)")
    p.add_argument("--student-copies", type=int, default=8,
                   help="the student's epoch: --images x this many samples (each copy its own sample)")
    p.add_argument("--min-steps", type=int, default=30, help="fewest student steps timed (else the script stops)")
    p.add_argument("--skip-steps", type=int, default=None,
                   help="student steps left out at each end (default: what the loader holds ahead, at least 3)")
    p.add_argument("--skip-student", action="store_true")
    p.add_argument("--skip-cache", action="store_true", help="only the student figures (per-core replay, loader)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "accelerator.json"))
    args = p.parse_args(argv)
    from bench._env import provenance

    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_accel_"))
    manifest = make_shards(work, args.images, args.shard_size)
    sizes = {}
    for s in manifest.shards:
        for raw in read_shard(manifest, s):
            with Image.open(io.BytesIO(raw.data)) as im:
                sizes[f"{im.size[0]}x{im.size[1]}"] = sizes.get(f"{im.size[0]}x{im.size[1]}", 0) + 1
    base = job_config(manifest, str(work / "unused.zarr"), 1.0)
    result = {"data": {"images": manifest.num_samples, "shards": len(manifest.shards), "shard_size": args.shard_size,
                       "jpeg_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
                       "bytes_per_image": round(sum(s.bytes for s in manifest.shards) / manifest.num_samples)},
              "views": VIEWS, "out_size": OUT, "batch_size": BATCH, "workers": args.workers}
    if not args.skip_cache:
        bench_cache(args, manifest, work, base, result)
    if not args.skip_student:
        bench_student(args, manifest, work, result)
    if not args.skip_cache:
        # capacity again, to show how much the machine's load moved during the run
        torch.set_num_threads(1)
        after = bench_per_core(base, manifest, 1)
        result["worker_capacity_per_core_at_end"] = after["worker_capacity_per_core"]
        result["replay_capacity_per_core_at_end"] = after["replay_capacity_per_core"]
    failed = mark_invalid(result, plausibility(result, args.workers))
    result["provenance"] = provenance()

    print()
    print(f"{'metric':<44}{'value':>10}  goal")
    for key, goal in TABLE:
        if key in result:
            value = "INVALID" if result[key] is None else result[key]
            print(f"{key:<44}{value:>10}  {goal}")
    write_result(args.out, result)
    if failed:
        print(f"\nbench/accelerator.py: PHYSICALLY IMPOSSIBLE figures ({len(failed)} checks failed), marked invalid "
              f"(None) in {args.out}:", file=sys.stderr)
        for c in failed:
            print(f"  {c['what']}: {c['measured']} > {c['bound']} = {c['basis']}", file=sys.stderr)
        return 3
    return 0


def write_result(path: str, result: dict) -> None:
    """Write ``result`` as JSON (with ``provenance`` unless the caller set it)."""
    if "provenance" not in result:
        from bench._env import provenance

        result["provenance"] = provenance()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
