"""What same-step repeated augmentation costs the student's loader, side by side.

    python bench/sampler.py [--images 480] [--shard-size 40] [--rounds 2]   # ~3 min on 2 cores

Data: ImageNet-like JPEG shards (``bench/photos.py``: real photos cropped to ImageNet's common
sizes, ~500x375), 3 views, DeiT's plan at 224 px. For each placement it replays rank 0's rows of
student epoch 0 in this process (one lane, one core) and counts what the loader did:

* ``ra`` (same step): the V views of a sample in one optimizer step, on neighbouring ranks
  (``rows[r::W]`` of every step, as DeiT's RASampler): every rank reads every shard of the epoch.
* ``ra, views on one rank``: the placement this project used before the same-step sampler (the
  epoch's rows in contiguous rank blocks, a sample's views together on one rank and worker): the
  same rows, laid out with ``schedule.lay_out`` over rank 0's block, to price the old costs.
* ``one_view``: one view of each sample, each rank its own block of shards.

Reported per placement and world size W: rows rank 0 trains on, shards it opens, bytes read and
decodes per trained image, and replay img/s per core (CPU time of this process). Rounds are
interleaved; the median is kept. Writes ``bench/results/sampler.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.loader as loader_mod  # noqa: E402
import pipeline.replay as replay_mod  # noqa: E402
from bench.accelerator import make_shards  # noqa: E402  (ImageNet-like photo crops in shards)
from pipeline.loader import LoaderConfig, ReplayLoader  # noqa: E402
from pipeline.plan import AugConfig  # noqa: E402
from pipeline.schedule import RankOrder, Schedule, lay_out  # noqa: E402

VIEWS, OUT, CLASSES, SEED = 3, 224, 1000, 0


def views_on_one_rank(sched: Schedule, world: int, batch: int) -> RankOrder:
    """Rank 0's block of the ra epoch with a sample's views kept together (the old placement)."""
    rows = sched.epoch_rows(0)
    n = len(rows)
    block = rows.take(np.arange(0, n // world))
    sizes = [batch] * (len(block) // batch) + ([len(block) % batch] if len(block) % batch else [])
    ordered, bounds = lay_out(block, sizes, 1, 4, VIEWS, (SEED, 0, 0))
    return RankOrder(ordered, [np.arange(a, b) for a, b in bounds], 1, VIEWS)


def measure(manifest, order: RankOrder, batch: int) -> dict:
    counts = {"shards": 0, "bytes": 0, "decodes": 0}
    read, decode = loader_mod.read_shard, replay_mod.decode_image

    def counting_read(m, shard, *a, **k):
        counts["shards"] += 1
        counts["bytes"] += int(shard.bytes)
        return read(m, shard, *a, **k)

    def counting_decode(*a, **k):
        counts["decodes"] += 1
        return decode(*a, **k)

    loader_mod.read_shard, replay_mod.decode_image = counting_read, counting_decode
    try:
        cfg = LoaderConfig(batch_size=batch, out_size=OUT, num_workers=0, interleave=4)
        cpu = time.process_time()
        rows = sum(len(b["label"]) for b in ReplayLoader(manifest, AugConfig(), SEED, order, cfg))
        cpu = time.process_time() - cpu
    finally:
        loader_mod.read_shard, replay_mod.decode_image = read, decode
    return {"rows": rows, "shards_opened": counts["shards"], "bytes_per_image": counts["bytes"] / rows,
            "decodes_per_image": counts["decodes"] / rows, "img_per_s_per_core": rows / cpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--shard-size", type=int, default=40)
    p.add_argument("--batch", type=int, default=16, help="rows per rank and step")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="/tmp/kdcache-bench-sampler")
    p.add_argument("--out", default=str(ROOT / "bench/results/sampler.json"))
    args = p.parse_args(argv)
    manifest = make_shards(Path(args.work), args.images, args.shard_size)
    ra = Schedule(manifest.shards, VIEWS, 1, SEED, sampler="ra")
    one = Schedule(manifest.shards, VIEWS, 1, SEED, sampler="one_view")
    cases = {}
    for world in (1, 8):
        cases[f"ra (same step), W={world}"] = ra.order(0, 0, world, args.batch, lanes=1)
        cases[f"ra, views on one rank (before), W={world}"] = views_on_one_rank(ra, world, args.batch)
        cases[f"one_view, W={world}"] = one.order(0, 0, world, args.batch, lanes=1)
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, order in cases.items():
            runs[name].append(measure(manifest, order, args.batch))
    table = {}
    for name, rs in runs.items():
        r = dict(rs[0])
        r["img_per_s_per_core"] = statistics.median(x["img_per_s_per_core"] for x in rs)
        table[name] = r
    print(f"{'placement':42s} {'rows':>5s} {'shards':>6s} {'MB/img':>7s} {'dec/img':>7s} {'img/s/core':>10s}")
    for name, r in table.items():
        print(f"{name:42s} {r['rows']:5d} {r['shards_opened']:6d} {r['bytes_per_image'] / 1e6:7.3f} "
              f"{r['decodes_per_image']:7.2f} {r['img_per_s_per_core']:10.1f}")
    for world in (1, 8):
        same, before = table[f"ra (same step), W={world}"], table[f"ra, views on one rank (before), W={world}"]
        print(f"W={world}: same-step / views-on-one-rank replay rate {same['img_per_s_per_core'] / before['img_per_s_per_core']:.2f}, "
              f"bytes per image x{same['bytes_per_image'] / before['bytes_per_image']:.1f}")
    result = {"images": args.images, "shard_size": args.shard_size, "batch_per_rank": args.batch, "views": VIEWS,
              "out_size": OUT, "rounds": args.rounds, "placements": table}
    try:
        from bench._env import provenance

        result["env"] = provenance()
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
