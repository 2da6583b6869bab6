"""The DeiT-S <- RegNetY-16GF table on a GPU: caching vs bare forward, cached vs online student, bf16.

    python bench/gpu.py                        # on a CUDA machine, ~10 min; writes bench/results/gpu.json
    python bench/gpu.py --device cpu --smoke   # the same code on CPU with tiny models (~1 min; numbers meaningless)

Needs no Ray (the per-item work runs without it): torch, torchvision, timm, numpy, Pillow, PyYAML
and the wheels of zarr, numcodecs and webdataset (kdcache's modules import them). Shards are
written and read with ``pipeline.writer``/``pipeline.shards`` (tarfile), the cache write is left out (its cost
is ``bench/cache.py``'s; a row is 16 bytes) and the cached student's targets are the teacher's
top-k of the same images, held on the GPU as the cache's rows would be after the join.
Weights are random (nothing is downloaded): speed does not depend on them.

* ``cache_over_forward``: images/s of the caching data path (``teacher.feed.ItemFeed``: the
  job's persistent replay workers, one per CPU core but one, each sample decoded once for 3
  views, rows finished into pinned batches, ``non_blocking`` copies) feeding
  ``Teacher.score`` over 8+ items with prefetch, after the first item, divided by the bare
  ``Teacher.forward_logits`` on a GPU-resident batch of the same size. Goal >= 0.9 if the CPUs
  can replay as fast as the GPU scores; the per-core replay rate is printed to tell.
* ``cached_over_online``: a DeiT-S (distilled) training step (``student.loop.train_epoch``,
  AdamW, bf16 autocast) with cached top-k targets vs with RegNetY-16GF run in the loop, on the
  same replayed batches (decode and augmentation excluded: identical in both), interleaved
  rounds. ``flop_limit`` = (student fwd+bwd + teacher fwd) / (student fwd+bwd) FLOPs, measured
  with ``FlopCounterMode`` (2.15 at 224 px); ``cached_over_online_vs_limit`` is the share of it
  reached (goal >= 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from accelerator import make_shards, write_result  # noqa: E402  (ImageNet-like JPEG shards from real photos)
from teacher.feed import ItemFeed, item_pairs  # noqa: E402
from teacher.job import CacheJobConfig, make_teacher  # noqa: E402
from pipeline.replay import ReplayRequest, replay_items  # noqa: E402
from pipeline.shards import read_shard  # noqa: E402
from teacher.work import score_item  # noqa: E402
from teacher.device import non_blocking, pin_memory  # noqa: E402

FULL = dict(teacher="regnety_160", student="deit_small_distilled_patch16_224", img=224, batch=256,
            student_batch=128, images=2304, shard_size=256, student_kwargs={})
SMOKE = dict(teacher="regnety_002", student="deit_tiny_distilled_patch16_224", img=64, batch=16,
             student_batch=8, images=96, shard_size=32,
             student_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def job_config(manifest, s: dict, workers: int) -> CacheJobConfig:
    return CacheJobConfig.from_dict(dict(
        shards=manifest.path, out="unused", epochs=1, views=3, k=10, batch_size=s["batch"], num_workers=workers,
        teacher=dict(name=s["teacher"], num_classes=1000, input_size=s["img"], amp="auto", channels_last=True)))


def bare_forward(teacher, s: dict, device: torch.device, batches: int) -> float:
    x = torch.randn(s["batch"], 3, s["img"], s["img"], device=device)
    teacher.forward_logits(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        teacher.forward_logits(x)
    sync(device)
    return batches * s["batch"] / (time.perf_counter() - t0)


def caching(cfg, manifest, teacher, device: torch.device) -> dict:
    """The job's data path + ``Teacher.score`` over every item, each prefetching the next."""
    feed = ItemFeed(cfg, manifest, cfg.teacher.input_size, pin=pin_memory(device))
    items = [(0, s.index) for s in manifest.shards]
    ends, images = [], []
    t0 = time.perf_counter()
    try:
        for i, item in enumerate(items):
            scored = score_item(feed, teacher, *item, prefetch=items[i + 1] if i + 1 < len(items) else None)
            ends.append(time.perf_counter())
            images.append(len(scored.sample_id))
    finally:
        feed.close()
    return {"items": len(items), "images": sum(images), "images_per_s_all": sum(images) / (ends[-1] - t0),
            "images_per_s_after_first_item": sum(images[1:]) / (ends[-1] - ends[0])}


def replay_per_core(cfg, manifest) -> float:
    """Images/s of the whole replay (decode once, 3 views, mix) on this core, one shard."""
    shard = manifest.shards[0]
    samples = read_shard(manifest, shard)
    t0, n = time.process_time(), 0
    for view in range(cfg.views):
        decoded: dict = {}
        request = ReplayRequest(cfg.aug, cfg.seed, 0, view, cfg.teacher.input_size, 1000)
        n += sum(1 for _ in replay_items(request, samples, shard, item_pairs(cfg, 0, view, shard), decoded=decoded))
    return n / (time.process_time() - t0)


def student_batches(cfg, manifest, teacher, s: dict, device: torch.device, count: int) -> list[dict]:
    """Replayed (image, target) batches with the teacher's top-10 as cached rows, on the device."""
    shard = manifest.shards[0]
    samples = read_shard(manifest, shard)
    items = list(replay_items(ReplayRequest(cfg.aug, cfg.seed, 0, 0, s["img"], 1000), samples, shard,
                              item_pairs(cfg, 0, 0, shard)))
    out = []
    for b in range(count):
        chunk = [items[(b * s["student_batch"] + i) % len(items)] for i in range(s["student_batch"])]
        images = torch.stack([it.image for it in chunk]).to(device, non_blocking=non_blocking(device))
        scored = teacher.score(images, k=10)
        out.append({"image": images, "target": torch.stack([it.target for it in chunk]).to(device),
                    "teacher_logprobs": scored.logprobs.float().clone(), "teacher_indices": scored.indices.clone()})  # not inference tensors
    return out


def student_rates(teacher, batches: list, s: dict, device: torch.device, rounds: int) -> dict:
    from student.loop import LoopParts, LoopState, StepConfig, resolve_precision, train_epoch
    from student.losses import DistillationLoss
    from student.models import build_student
    from student.optim import build_optimizer
    from student.targets import CachedTargets, OnlineTargets

    precision = resolve_precision("auto", device)
    modes = {"cached": CachedTargets(), "online": OnlineTargets(teacher.forward_logits, 10, s["img"])}
    runs = {}
    for name, fn in modes.items():
        torch.manual_seed(0)
        model = build_student(s["student"], 1000, s["img"], 0.1, s["student_kwargs"]).to(device)
        runs[name] = dict(model=model, opt=build_optimizer(model, "adamw", 5e-4, 0.05), fn=fn, rates=[],
                          loss=DistillationLoss("hard", 1000))
    for r in range(rounds + 1):  # round 0 warms up (cudnn autotune, allocator)
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            parts = LoopParts(run["model"], run["loss"], run["fn"], run["opt"], precision, device)
            train_epoch(parts, StepConfig(num_batches=len(batches)), [dict(b) for b in batches], LoopState())
            sync(device)
            if r:
                run["rates"].append(len(batches) * s["student_batch"] / (time.perf_counter() - t0))
        if r:
            print(f"round {r}: " + "  ".join(f"{k} {v['rates'][-1]:.0f} img/s" for k, v in runs.items()), flush=True)
    ratio = statistics.median(c / o for c, o in zip(runs["cached"]["rates"], runs["online"]["rates"]))
    return {"cached_images_per_s": statistics.median(runs["cached"]["rates"]),
            "online_images_per_s": statistics.median(runs["online"]["rates"]), "cached_over_online": ratio}


def flop_limit(teacher, s: dict, device: torch.device) -> dict:
    from student.models import build_student

    student = build_student(s["student"], 1000, s["img"], 0.1, s["student_kwargs"]).to(device)
    x = torch.randn(2, 3, s["img"], s["img"], device=device)
    with FlopCounterMode(display=False) as fc:
        out = student(x)
        sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    student_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        teacher.forward_logits(x)
    teacher_flops = fc.get_total_flops()
    return {"student_fwd_bwd_gflop_per_image": student_flops / 2e9, "teacher_fwd_gflop_per_image": teacher_flops / 2e9,
            "flop_limit": (student_flops + teacher_flops) / student_flops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny models and data (a CPU check of the code path)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here (use --device cpu --smoke to check the code path)")
    s = SMOKE if args.smoke else FULL
    torch.backends.cudnn.benchmark = True

    work = Path(tempfile.mkdtemp(prefix="kdcache_bench_gpu_"))
    manifest = make_shards(work, s["images"], s["shard_size"])
    cfg = job_config(manifest, s, args.workers)
    teacher = make_teacher(cfg, str(device))
    result = {"command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "cpu_count": os.cpu_count(), "workers": args.workers, "torch": torch.__version__, "setup": s,
              "teacher_amp": "bf16 autocast" if device.type == "cuda" else "fp32",
              "replay_per_core_images_per_s": replay_per_core(cfg, manifest)}
    forward = bare_forward(teacher, s, device, batches=max(4, s["images"] * 3 // s["batch"] // 2))
    cache = caching(cfg, manifest, teacher, device)
    result.update(forward_images_per_s=forward, caching=cache,
                  cache_over_forward=cache["images_per_s_after_first_item"] / forward)
    print(f"bare forward {forward:.0f} img/s, caching {cache['images_per_s_after_first_item']:.0f} img/s "
          f"-> cache_over_forward {result['cache_over_forward']:.3f}", flush=True)
    batches = student_batches(cfg, manifest, teacher, s, device, count=4 if args.smoke else 8)
    student = student_rates(teacher, batches, s, device, args.rounds)
    limits = flop_limit(teacher, s, device)
    result.update(student=student, **limits,
                  cached_over_online_vs_limit=student["cached_over_online"] / limits["flop_limit"])
    print(json.dumps({k: result[k] for k in ("cache_over_forward", "flop_limit", "cached_over_online_vs_limit")}
                     | {"cached_over_online": student["cached_over_online"]}, indent=1))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
