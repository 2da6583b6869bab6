"""Reading a shard: the one reader (``pipeline.shards.read_shard``) against webdataset's tar
iteration, which the student's loader used before, on one local JPEG shard.

    python bench/shard_read.py          # ~30 s on 2 CPU cores; writes bench/results/shard_read.json

Data: 256 ImageNet-like JPEGs (``bench/photos.py``) in one shard written by ``make_shards``.
Each round reads the whole shard once per way, in rotating order (so drift hits every way);
medians over the rounds, and every figure is a ratio to webdataset measured in the same run.
Ways: webdataset ``tarfile_to_samples`` + the same per-sample parse (the old loader path);
``read_shard`` from the path, from a ``file://`` URL (through fsspec), from ``pipe:cat``, and
with ``verify=True`` (sha256 computed on the way). No decoding: this is the reading alone.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import webdataset as wds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._env import provenance  # noqa: E402
from bench.photos import imagenet_jpegs  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.shards import parse_sample, read_shard  # noqa: E402
from pipeline.writer import SourceSample, write_shards  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "shard_read.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kdcache-shard-read-"))
    samples = [SourceSample(key=f"img{i:05d}", label=i % 10, path=f"photo{i}", data=data)
               for i, data in enumerate(imagenet_jpegs(args.images))]
    m = write_shards(samples, work, "train", [str(c) for c in range(10)], args.images, shuffle_seed=None)
    shard = m.shards[0]
    url = m.url(shard)

    def webdataset_way():
        fields = list(wds.tarfile_to_samples()([{"url": url}]))
        return [parse_sample(f, f["__key__"], shard, i) for i, f in enumerate(fields)]

    file_manifest, pipe_manifest = load_manifest(f"file://{work}/train"), load_manifest(work / "train")
    pipe_manifest.shards[0] = type(shard)(**{**shard.__dict__, "url": f"pipe:cat {url}"})
    ways = {
        "webdataset tarfile_to_samples (the loader before)": webdataset_way,
        "read_shard, path": lambda: read_shard(m, shard),
        "read_shard, file:// (fsspec)": lambda: read_shard(file_manifest, shard),
        "read_shard, pipe:cat": lambda: read_shard(pipe_manifest, pipe_manifest.shards[0]),
        "read_shard, path, verify=True (sha256)": lambda: read_shard(m, shard, verify=True),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    names = list(ways)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            assert len(ways[name]()) == args.images
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    mb = shard.bytes / 1e6
    rows = {name: {"ms": 1000 * statistics.median(t), "mb_per_s": mb / statistics.median(t),
                   "ratio_to_webdataset": statistics.median(t) / base} for name, t in times.items()}
    print(f"one shard: {args.images} JPEGs, {mb:.1f} MB; median of {args.rounds} rounds")
    print(f"{'way':48s} {'ms':>8s} {'MB/s':>8s} {'÷ webdataset':>13s}")
    for name, row in rows.items():
        print(f"{name:48s} {row['ms']:8.1f} {row['mb_per_s']:8.0f} {row['ratio_to_webdataset']:13.2f}")
    Path(args.out).write_text(json.dumps({
        "machine": platform.platform(), "python": platform.python_version(), "images": args.images,
        "shard_mb": mb, "rounds": args.rounds, "ways": rows, "provenance": provenance()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
