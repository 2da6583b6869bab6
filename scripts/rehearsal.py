"""ImageNet-shaped rehearsal: catch what a toy demo cannot before a run spends GPU-days.

    bash scripts/rehearsal.sh            # full: 100 classes x 12 images, 2 cache epochs x 3 views
    bash scripts/rehearsal.sh --quick    # short version (CI, tests/test_rehearsal.py)
    python scripts/rehearsal.py [--quick] [--out DIR] [--data URL] [--cache URL]

Input: an ImageNet-shaped folder tree made from real photos (``bench/photos.py``): 100 class
folders with synset-like names written in sorted order and labelled within ImageNet's 1000
classes (``--classes``), JPEGs at ImageNet's common sizes (mostly 500x375), plus odd files (16-bit PNG,
EXIF-rotated JPEG, CMYK JPEG, palette PNG with transparency, grayscale JPEG, a truncated JPEG).

Flow, with the commands a user types: ``make_shards imagefolder`` (small shards, ``--skip-bad``)
-> ``teacher.cache`` with ``configs/cache/imagenet_regnety160.yaml`` (Ray, embedded) where only
the teacher is swapped for the real 1000-class EfficientNet-Lite0 (224 px, full DeiT recipe,
3 views) -> ``student.train`` with ``configs/student/deit_s_imagenet_hard.yaml`` overriding only
size (a tiny distilled DeiT, batch, epochs) -> ``teacher.audit``.

It prints and checks (exit 1 when a check fails):
* distinct classes per student batch, against uniform random sampling (>= 90 %);
* the same-class Mixup/CutMix pair rate, against 2/C plus three binomial standard errors;
* rows read per student epoch = N;
* cache rows = epochs x N x views (the truncated file skipped by make_shards, none lost later);
* audit top-1 agreement of re-scored replays with the cache (100 % in fp32);
* bytes per cached row.
Results go to ``OUT/rehearsal.json``. ``--data`` and ``--cache`` put the shards and the cache
where a real run keeps them (any path or fsspec URL, e.g. ``s3://bucket/rehearsal``; credentials
from the environment), so the rehearsal also checks that every stage reads and writes there.
"""
from __future__ import annotations

import argparse
import atexit
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import urls  # noqa: E402

SIZES = {  # classes x train/val images per class, shard size, cache epochs, audit rows per epoch
    "quick": dict(classes=100, train=2, val=1, shard=32, epochs=1, audit=60),
    "full": dict(classes=100, train=12, val=2, shard=64, epochs=2, audit=300),
}
VIEWS, BATCH = 3, 32


def run(cmd: list[str], log: Path) -> None:
    """Run a CLI as a user would; its output goes to ``log`` (shown when it fails)."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.stderr.write(Path(log).read_text()[-4000:])
        raise SystemExit(f"rehearsal: {cmd[2]} failed (exit {proc.returncode}), log {log}")


def build_tree(out: Path, size: dict) -> tuple[Path, Path]:
    from bench.photos import real_photos, write_imagenet_tree

    synsets = [f"n{i:08d}" for i in range(1000)]                 # ImageNet's 1000 labels
    classes_file = out / "classes.txt"
    classes_file.write_text("\n".join(synsets) + "\n")
    present = synsets[:: 1000 // size["classes"]]                 # 100 of them have images
    photos = real_photos()
    write_imagenet_tree(out / "tree" / "train", present, size["train"], seed=0, corrupt=True, photos=photos)
    write_imagenet_tree(out / "tree" / "val", present, size["val"], seed=1, odd_files=False, photos=photos)
    return out / "tree", classes_file


def batch_stats(train_cfg, epochs: int) -> dict:
    """Distinct classes per student batch and same-class mix pairs, against uniform sampling.

    Uses the student's own loader on the run's config (replayed at 32 px: order and rows do not
    depend on the size) for one pass over the cache. The uniform baseline draws batches at
    random from the rows the same epoch reads (with the ra sampler: N/3 samples x 3 views), as
    many distinct samples as the batch holds: a batch holds a sample's views together (repeated
    augmentation in one step, as DeiT's RASampler), so about B/3 samples.
    """
    from pipeline.classmix import expected_distinct
    from pipeline.manifest import load_manifest
    from pipeline.shards import iter_samples
    from student.data import TrainData, open_checked_cache

    cfg = train_cfg.replace(data=train_cfg.data.replace(img_size=32))
    manifest = load_manifest(cfg.data.train)
    reader, plan = open_checked_cache(cfg, manifest)
    data = TrainData(cfg, manifest, plan, reader, log=lambda *_: None)
    label = {s.sample_id: s.label for s in iter_samples(manifest)}
    distinct, uniform, samples, pairs, same = [], [], [], 0, 0
    for t in range(epochs * plan.views):
        rows = Counter()
        for u in data.schedule.units(t):
            for a, p in u.pairs(plan.seed, manifest.shards[u.shard]):
                rows[label[a]] += 1
                pairs += 1
                same += label[a] == label[p]
        for b in data.loader(t):
            if len(b["label"]) == data.batch_size:
                distinct.append(len(set(b["label"].tolist())))
                samples.append(len(set(b["sample_id"].tolist())))
                uniform.append(expected_distinct(list(rows.values()), samples[-1]))
    c = len(set(label.values()))
    return {"distinct_per_batch": sum(distinct) / len(distinct), "batches": len(distinct),
            "samples_per_batch": sum(samples) / len(samples),
            "distinct_uniform": sum(uniform) / len(uniform), "classes": c,
            "same_class_pairs": same / pairs, "pairs": pairs, "same_class_bound": 2 / c,
            "same_class_tolerance": 3 * math.sqrt((2 / c) * (1 - 2 / c) / pairs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short version (CI)")
    ap.add_argument("--out", default=None, help="work folder (default runs/rehearsal[-quick])")
    ap.add_argument("--data", default=None, help="where make_shards writes the shards, a path or URL "
                                                 "(default OUT/shards)")
    ap.add_argument("--cache", default=None, help="where the cache goes, a path or URL (default OUT/cache.zarr)")
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out or REPO / ("runs/rehearsal-quick" if args.quick else "runs/rehearsal")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    py = sys.executable
    from teacher.ray_env import private_ray_env

    # The rehearsal's Ray: a fresh local instance with token auth and a token of its own (not ~/.ray)
    ray_dir = tempfile.mkdtemp(prefix="kdcache_rehearsal_ray_")
    atexit.register(shutil.rmtree, ray_dir, True)
    os.environ.update(private_ray_env(ray_dir))

    tree, classes = build_tree(out, size)
    shards = args.data or str(out / "shards")
    train_split, val_split = urls.join(shards, "train"), urls.join(shards, "val")
    run([py, "-m", "pipeline.make_shards", "imagefolder", "--root", tree, "--classes", classes, "--out", shards,
         "--shard-size", size["shard"], "--skip-bad", "--overwrite"], out / "make_shards.log")

    from teacher.efficientnet_lite import lite0_weights_path

    cache = args.cache or str(out / "cache.zarr")
    run([py, "-m", "teacher.cache", "--config", "configs/cache/imagenet_regnety160.yaml", "--no-progress",
         "--ray-address", "local",
         f"shards={train_split}", f"out={cache}", f"epochs={size['epochs']}", f"views={VIEWS}",
         f"batch_size={BATCH}", "num_workers=1", "teacher.name=tf_efficientnet_lite0",
         f"teacher.checkpoint={lite0_weights_path()}"], out / "cache.log")

    student = out / "student"
    overrides = [f"data.train={train_split}", f"data.val={val_split}", f"cache.path={cache}",
                 "model.name=deit_tiny_distilled_patch16_224",
                 "model.model_kwargs={embed_dim: 64, depth: 2, num_heads: 2}",
                 f"data.batch_size={BATCH}", "data.num_workers=1", "data.eval_batch_size=64",
                 f"run.epochs={size['epochs'] * VIEWS}", "optim.warmup_epochs=1", f"run.out={student}",
                 "run.progress=false", "run.plot=false"]
    run([py, "-m", "student.train", "--config", "configs/student/deit_s_imagenet_hard.yaml", *overrides],
        out / "student.log")
    audit_json = out / "audit.json"
    run([py, "-m", "teacher.audit", cache, "--samples", size["audit"], "--json", "--out", audit_json],
        out / "audit.log")

    from pipeline.config import load_config
    from pipeline.manifest import load_manifest
    from student.config import TrainConfig

    manifest = load_manifest(train_split)
    n = manifest.num_samples
    summary = json.loads(urls.read_bytes(urls.join(cache, "summary.json")))
    with open(student / "metrics.csv", newline="") as f:
        epoch_rows = [r for r in csv.DictReader(f) if r.get("train_images")]
    audit = json.loads(audit_json.read_text())
    stats = batch_stats(load_config(TrainConfig, REPO / "configs/student/deit_s_imagenet_hard.yaml", overrides),
                        size["epochs"])
    rows_per_epoch = [int(float(r["train_images"]) + float(r.get("train_dropped") or 0)) for r in epoch_rows]
    agree = min(r["top1_agree"] for r in audit.values())
    checks = {
        "batches class-mixed (>= 90% of uniform)":
            (f"{stats['distinct_per_batch']:.1f} vs {stats['distinct_uniform']:.1f} distinct classes in batches of {BATCH} "
             f"({stats['samples_per_batch']:.1f} samples each: views together)",
             stats["distinct_per_batch"] >= 0.9 * stats["distinct_uniform"]),
        "same-class mix pairs (<= 2/C + 3 s.e.)":
            (f"{100 * stats['same_class_pairs']:.2f}% vs {100 * stats['same_class_bound']:.1f}% "
             f"+ {100 * stats['same_class_tolerance']:.1f}% ({stats['pairs']} pairs)",
             stats["same_class_pairs"] <= stats["same_class_bound"] + stats["same_class_tolerance"]),
        "rows per student epoch = N": (f"{rows_per_epoch} vs N = {n}", all(r == n for r in rows_per_epoch)),
        "cache rows = epochs x N x views":
            (f"{summary['images']} + {len(summary['skipped'])} skipped vs {size['epochs']} x {n} x {VIEWS}",
             summary["images"] == size["epochs"] * n * VIEWS and summary["rows"] == summary["images"]),
        "audit top-1 agreement (fp32)": (f"{100 * agree:.2f}% of {sum(r['rows'] for r in audit.values())} rows",
                                         agree == 1.0),
    }
    result = {
        "size": "quick" if args.quick else "full", "seconds": round(time.time() - t0, 1),
        "data": shards, "cache": cache,
        "images": n, "classes_with_images": stats["classes"], "num_classes": manifest.num_classes,
        "shards": len(manifest.shards), "skipped_by_make_shards": [s["path"] for s in manifest.skipped],
        "cache_epochs": size["epochs"], "views": VIEWS, "bytes_per_row": summary["bytes_per_row"],
        "cache_images_per_s": summary["images_per_s"], "batch": stats, "rows_per_student_epoch": rows_per_epoch,
        "audit": audit, "student_val_top1_fused": float(epoch_rows[-1].get("val_top1_fused") or "nan"),
        "checks": {name: {"value": v, "ok": ok} for name, (v, ok) in checks.items()},
    }
    from bench._env import provenance

    result["provenance"] = provenance()
    (out / "rehearsal.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nrehearsal ({result['size']}): {n} images of {stats['classes']} classes (labels in "
          f"{manifest.num_classes}), {len(manifest.shards)} shards; {len(manifest.skipped)} file(s) skipped by "
          f"make_shards; {result['seconds']:.0f} s")
    print(f"  bytes per cached row: {summary['bytes_per_row']:.2f}; caching: {summary['images_per_s']:.1f} img/s")
    for name, (value, ok) in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {value}")
    print(f"results: {out / 'rehearsal.json'}")
    return 0 if all(ok for _, ok in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
