"""Augmentation speed: replayable plan (sample_params + apply) vs timm's create_transform.

    python bench/augment.py            # ~1 minute on 2 CPU cores; writes bench/results/augment.json

Both sides get the same decoded PIL photos from skimage.data (no JPEG decode), run in
one process with ``torch.set_num_threads(1)`` and output normalized 224 px tensors.
Neither side includes Mixup/CutMix (timm mixes whole batches afterwards; our ``mix`` is
a single lerp/paste) — this measures the per-image transform only.  Rounds alternate
plan/timm order (ABBA) so drift hits both sides; medians over rounds are reported.
The headline numbers use process CPU time (the process is single-threaded), which stays
meaningful on a shared, loaded machine; wall-clock rates are recorded beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import timm
import torch
from PIL import Image
from timm.data import create_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._env import provenance  # noqa: E402
from pipeline.plan import AugConfig, apply, sample_params  # noqa: E402

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle", "immunohistochemistry")


def _patch_timm_posterize() -> None:
    """timm's posterize calls Pillow with 0 bits at magnitude 10, which Pillow 13 rejects;
    give timm the pre-Pillow-13 result (black image), the same as pipeline.randaugment."""
    from timm.data import auto_augment as taa

    original = taa.posterize

    def posterize(img, bits_to_keep, **kw):
        return Image.new(img.mode, img.size, 0) if bits_to_keep <= 0 else original(img, bits_to_keep, **kw)

    for name, fn in list(taa.NAME_TO_OP.items()):
        if fn is original:
            taa.NAME_TO_OP[name] = posterize


def load_photos() -> list[Image.Image]:
    import skimage.data as skdata

    photos = []
    for name in PHOTOS:
        rgb = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
        photos.append(Image.fromarray(rgb).convert("RGB"))
    return photos


def _rates(n: int, wall0: float, cpu0: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this single-threaded process)."""
    return n / (time.perf_counter() - wall0), n / (time.process_time() - cpu0)


def time_plan(photos, cfg, n, out_size, start_id) -> tuple[float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        img = photos[i % len(photos)]
        params = sample_params(cfg, 0, 0, start_id + i, 0, img.size)
        apply(img, params, out_size, cfg)
    return _rates(n, wall0, cpu0)


def time_timm(photos, transform, n) -> tuple[float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        transform(photos[i % len(photos)])
    return _rates(n, wall0, cpu0)


def machine_info() -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "pillow": PIL.__version__, "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=150, help="images per side per round")
    parser.add_argument("--out-size", type=int, default=224)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "augment.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    photos = load_photos()
    cfg = AugConfig()  # DeiT defaults
    _patch_timm_posterize()  # before create_transform: AugmentOp binds NAME_TO_OP at construction
    transform = create_transform(
        args.out_size, is_training=True, auto_augment=cfg.auto_augment, interpolation=cfg.interpolation,
        re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=1, mean=cfg.mean, std=cfg.std,
    )
    time_plan(photos, cfg, 30, args.out_size, 10**9)  # warm-up both sides
    time_timm(photos, transform, 30)

    walls: dict[str, list[float]] = {"plan": [], "timm": []}
    cpus: dict[str, list[float]] = {"plan": [], "timm": []}
    for r in range(args.rounds):
        sides = [("plan", lambda: time_plan(photos, cfg, args.per_round, args.out_size, r * args.per_round)),
                 ("timm", lambda: time_timm(photos, transform, args.per_round))]
        for name, run in (sides if r % 2 == 0 else sides[::-1]):
            wall, cpu = run()
            walls[name].append(wall)
            cpus[name].append(cpu)
        print(f"round {r:2d}: plan {cpus['plan'][-1]:7.1f} img/cpu-s  timm {cpus['timm'][-1]:7.1f} img/cpu-s  "
              f"ratio {cpus['plan'][-1] / cpus['timm'][-1]:.3f}   (wall: {walls['plan'][-1]:6.1f} vs "
              f"{walls['timm'][-1]:6.1f})", flush=True)
    plan_rates, timm_rates = cpus["plan"], cpus["timm"]

    n = 2000
    cpu0 = time.process_time()
    for i in range(n):
        sample_params(cfg, 0, 1, i, 0, (500, 375))
    params_us = (time.process_time() - cpu0) / n * 1e6

    plan_med, timm_med = statistics.median(plan_rates), statistics.median(timm_rates)
    wall_plan, wall_timm = statistics.median(walls["plan"]), statistics.median(walls["timm"])
    result = {
        "command": "python " + " ".join(sys.argv),
        "what": "per-image train transform, decoded PIL in -> normalized [3,224,224] float tensor out; "
                "no decode, no Mixup/CutMix on either side; single process, torch.set_num_threads(1)",
        "timm_transform": "create_transform(224, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', "
                          "interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1)",
        "photos": {name: list(p.size) for name, p in zip(PHOTOS, photos)},
        "out_size": args.out_size, "rounds": args.rounds, "images_per_round": args.per_round,
        "plan_images_per_s": round(plan_med, 1),
        "timm_images_per_s": round(timm_med, 1),
        "ratio": round(plan_med / timm_med, 3),
        "ratio_median_per_round": round(statistics.median(p / t for p, t in zip(plan_rates, timm_rates)), 3),
        "rate_basis": "images per CPU second of the single-threaded process (time.process_time)",
        "wall_plan_images_per_s": round(wall_plan, 1),
        "wall_timm_images_per_s": round(wall_timm, 1),
        "wall_ratio": round(wall_plan / wall_timm, 3),
        "load_average_at_end": list(os.getloadavg()),
        "sample_params_us": round(params_us, 1),
        "plan_rounds": [round(x, 1) for x in plan_rates],
        "timm_rounds": [round(x, 1) for x in timm_rates],
        "machine": machine_info(),
    }
    print()
    print(f"{'side':<8}{'img/cpu-s':>14}{'min':>10}{'max':>10}{'wall img/s':>14}")
    for name, rates in (("plan", plan_rates), ("timm", timm_rates)):
        print(f"{name:<8}{statistics.median(rates):>14.1f}{min(rates):>10.1f}{max(rates):>10.1f}"
              f"{statistics.median(walls[name]):>14.1f}")
    print(f"ratio plan/timm = {result['ratio']:.3f} (per-round median {result['ratio_median_per_round']:.3f}); "
          f"wall ratio {result['wall_ratio']:.3f}; sample_params alone {params_us:.1f} cpu-us/call")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result["provenance"] = provenance()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
