"""Scale benchmark: an ImageNet-shaped cache written, packed and streamed (issue 18).

    python bench/scale.py            # 1,281,167 samples in 1282 shards, 1 epoch x 3 views, k=10, tail D=56
    python bench/scale.py --quick    # 64 shards of 1000 (a minute)
    (bench/results/scale.json was made with one of these; its "mode" says which)

Rows are synthetic but go through the real writer (``CacheWriter.write_item`` of every (epoch,
shard) item, whole-chunk writes, done marker last): a pool of 4 items is encoded by the writer from
random 1000-class logits (``CacheWriter.encode``: top-k codes, gaps, tail mass, learned-tail codes
against a basis fitted on such logits), and each item stores one of them with its rows rolled, so
chunks compress as a real item of these logits does (no two neighbouring items identical). The
encoding itself is the caching job's thread work (teacher/work.py) and is not timed here.

Figures: write rows/s (local disk), pack rows/s (``python -m storage.pack``, local to local),
objects and bytes before/after packing, reader rows/s of the packed copy from local disk and from
a local HTTP server on 127.0.0.1 (Python's threaded http.server with range requests: the shard
index once, then the inner chunks), each in a fresh subprocess whose peak RSS is the reader's: the
epoch is loaded, with ``CacheReader.preload`` (runs of 128 items per read) or item by item as the
student's prefetch thread does today (``*_per_item``), and every row of it is looked up in shuffled
batches of 1024, as a student's join does. Extrapolations scale objects,
bytes and pack hours linearly in rows and epochs (per-epoch files: 6 per epoch + ~20 fixed).

Resume at scale (``--listing``): the done markers of 1 and 10 ImageNet epochs (1282 / 12,820
objects) on a local S3 server (moto), listed as the caching job's resume does
(``CacheReader.done_items``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # servers.py: the HTTP (range requests) and moto S3 servers of the tests

from storage import create_cache, open_cache  # noqa: E402
from zarr.core.sync import sync  # noqa: E402

from storage.cache import _open_group  # noqa: E402
from storage.pack import pack  # noqa: E402

IMAGENET, SHARD = 1_281_167, 1000
VIEWS, K, C, D = 3, 10, 1000, 56
BATCH = 1024


def shards_for(samples: int) -> list[tuple[int, int]]:
    return [(first, min(SHARD, samples - first)) for first in range(0, samples, SHARD)]


def count_files(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def write(path: Path, shards: list[tuple[int, int]]) -> float:
    """Write every item of a 1-epoch cache through the real writer; returns seconds of the writes."""
    from storage.tail import TailModel

    rng = np.random.default_rng(0)
    attrs = {"teacher": "synthetic", "checkpoint_sha256": "0" * 64, "fingerprint": "f" * 64,
             "manifest_sha256": "m" * 64, "seed": 0, "k": K, "epochs": 1, "views": VIEWS}
    w = create_cache(path, shards=shards, epochs=1, views=VIEWS, k=K, num_classes=C, attrs=attrs, tail_dim=D)
    w.write_tail(TailModel.fit((rng.standard_t(4, size=(1024, C)) * 2).astype(np.float32), D, 3.5))
    n = SHARD * VIEWS
    pool = []
    for _ in range(4):
        logits = (rng.standard_t(4, size=(n, C)) * 2).astype(np.float32)
        top = np.argsort(-logits, 1)[:, :K]
        lp = np.take_along_axis(logits, top, 1) - np.log(np.exp(logits.astype(np.float64)).sum(1))[:, None]
        pool.append((w.encode(lp.astype(np.float32), top, logits), lp.astype(np.float32), top))
    seconds = 0.0
    for s, (first, count) in enumerate(shards):
        rows, lp, top = pool[s % len(pool)]
        shift = (s * 7919) % n
        m = count * VIEWS
        enc = type(rows)(*(None if a is None else np.roll(a, shift, axis=0)[:m] for a in rows))
        ids, views = np.repeat(np.arange(first, first + count), VIEWS), np.tile(np.arange(VIEWS), count)
        logits = np.broadcast_to(np.zeros(1, np.float32), (m, C))  # shape only: the rows come encoded
        start = time.perf_counter()
        w.write_item(0, s, ids, views, lp[:m], top[:m], logits=logits, encoded=lambda enc=enc: (enc, None))
        seconds += time.perf_counter() - start
    return seconds


def read(url: str, per_item: bool) -> dict:
    """(In a fresh process) load epoch 0 and look up every row of it in shuffled batches; rows/s
    and peak RSS. Loaded with ``preload`` (runs of 128 shards per read), or ``per_item``: one item
    at a time, as the student's prefetch thread loads today (``lookup_rows`` of one row per shard)."""
    reader = open_cache(url)
    reader.tail_model()  # imports torch (storage/tail.py): not the reader's time
    rss_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = reader.num_samples
    order = np.random.default_rng(1).permutation(n * VIEWS)
    start = time.perf_counter()
    if per_item:
        for first, _ in reader.shards:
            reader.lookup_rows(0, np.array([first]), np.zeros(1, np.int64))
    else:
        reader.preload(0)
    valid = 0
    for lo in range(0, len(order), BATCH * 64):
        rows = order[lo:lo + BATCH * 64]
        for b in range(0, len(rows), BATCH):
            got = reader.lookup_rows(0, rows[b:b + BATCH] // VIEWS, rows[b:b + BATCH] % VIEWS)
            valid += int(got.valid.sum())
    seconds = time.perf_counter() - start
    assert valid == n * VIEWS, f"{url}: {valid} valid rows of {n * VIEWS}"
    return {"rows": n * VIEWS, "seconds": seconds, "rows_per_s": n * VIEWS / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_open_mb": rss_open}


def read_in_subprocess(url: str, per_item: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--read", url] + (["--per-item"] if per_item else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _count(store, prefix: str) -> int:
    return len([k async for k in store.list_prefix(prefix)])


def listing(shards: list[tuple[int, int]], epochs_list=(1, 10)) -> dict:
    """Seconds to find the done markers on moto S3 as a resume does, for 1 and 10 epochs of markers."""
    from servers import new_bucket, s3_server

    out = {}
    with s3_server():
        bucket = new_bucket("kdcache-scale")
        url = f"{bucket}/cache.zarr"
        create_cache(url, shards=shards, epochs=100, views=VIEWS, k=K, num_classes=C,
                     attrs={"fingerprint": "f"}, tail_dim=0)
        marker = json.dumps({"missing": [], "rows": SHARD * VIEWS})
        written = 0
        for n_epochs in sorted(epochs_list):
            done = _open_group(url, "a")["done"]  # one marker chunk per item, as the writer stores them
            for e in range(written, n_epochs):
                done[e, :] = np.array([marker] * len(shards))
            written = n_epochs
            reader = open_cache(url)
            start = time.perf_counter()
            items = reader.done_items()
            seconds = time.perf_counter() - start
            assert len(items) == n_epochs * len(shards), len(items)
            store_path = reader._done.store_path
            start = time.perf_counter()
            keys = sync(_count(store_path.store, f"{store_path.path}/c/"))
            list_seconds = time.perf_counter() - start
            out[f"{n_epochs}_epochs"] = {"markers": len(items), "done_items_seconds": round(seconds, 2),
                                         "list_only_seconds": round(list_seconds, 2), "listed": keys}
    return out


READ_KEYS = ("read_rows_per_s_local", "read_rows_per_s_http", "read_rows_per_s_local_per_item",
             "read_rows_per_s_http_per_item", "reader_peak_rss_mb", "reader_rss_after_open_mb", "http_gets",
             "http_gets_per_item")


def reread(packed: Path, out: Path) -> int:
    """The read figures of ``out`` measured again on the packed copy ``packed`` (same rows)."""
    from servers import http_server

    result = json.loads(out.read_text())
    before = {k: result.get(k) for k in READ_KEYS}
    local, local_item = read_in_subprocess(str(packed)), read_in_subprocess(str(packed), per_item=True)
    requests: list = []
    with http_server(packed.parent, requests) as base:
        http = read_in_subprocess(f"{base}/{packed.name}")
        gets = len(requests)
        http_item = read_in_subprocess(f"{base}/{packed.name}", per_item=True)
    result.update({"read_rows_per_s_local": round(local["rows_per_s"]), "read_rows_per_s_http": round(http["rows_per_s"]),
                   "read_rows_per_s_local_per_item": round(local_item["rows_per_s"]),
                   "read_rows_per_s_http_per_item": round(http_item["rows_per_s"]),
                   "reader_peak_rss_mb": round(max(local["peak_rss_mb"], http["peak_rss_mb"])),
                   "reader_rss_after_open_mb": round(http["rss_after_open_mb"]),
                   "http_gets": gets, "http_gets_per_item": len(requests) - gets})
    result.setdefault("reads_before", []).append(before)
    result["reads_note"] = ("reads re-measured (--reread) on the packed copy of this run after CacheReader.preload "
                            "changed to one read per array for a whole epoch; reads_before: the figures before")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in READ_KEYS}, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 shards of 1000 samples instead of ImageNet's 1282")
    p.add_argument("--work", default="/tmp/kdcache-scale", help="scratch folder (removed at the end)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    p.add_argument("--listing", action="store_true", help="also time the done-marker listing on moto S3")
    p.add_argument("--read", default=None, help=argparse.SUPPRESS)  # internal: one reader run
    p.add_argument("--per-item", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--listing-only", action="store_true", help="only time the done-marker listing on moto S3")
    p.add_argument("--reread", default=None, help="re-measure only the reads of a packed copy kept from a run "
                                                  "(e.g. after a reader change) and update --out, keeping the old figures")
    args = p.parse_args(argv)
    if args.read:
        print(json.dumps(read(args.read, args.per_item)))
        return 0
    if args.reread:
        return reread(Path(args.reread), Path(args.out))
    if args.listing_only:
        print(json.dumps(listing(shards_for(IMAGENET))))
        return 0

    from servers import http_server

    samples = 64 * SHARD if args.quick else IMAGENET
    shards = shards_for(samples)
    rows = samples * VIEWS
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        src, dst = work / "cache.zarr", work / "packed" / "cache.zarr"
        write_s = write(src, shards)
        objects_unpacked, bytes_unpacked = count_files(src)
        print(f"write: {rows:,} rows in {write_s:.1f} s; {objects_unpacked:,} objects, {bytes_unpacked:,} bytes")
        start = time.perf_counter()
        manifest = pack(str(src), str(dst), log=None)
        pack_s = time.perf_counter() - start
        objects_packed, bytes_packed = count_files(dst)
        print(f"pack: {pack_s:.1f} s; {objects_packed} objects, {bytes_packed:,} bytes")
        local = read_in_subprocess(str(dst))
        print(f"read local: {local['rows_per_s']:,.0f} rows/s, peak RSS {local['peak_rss_mb']:.0f} MB")
        requests: list = []
        with http_server(dst.parent, requests) as base:
            http = read_in_subprocess(f"{base}/cache.zarr")
            gets = len(requests)
            http_item = read_in_subprocess(f"{base}/cache.zarr", per_item=True)
            gets_item = len(requests) - gets
        print(f"read http: {http['rows_per_s']:,.0f} rows/s, peak RSS {http['peak_rss_mb']:.0f} MB, {gets} GETs; "
              f"per item {http_item['rows_per_s']:,.0f} rows/s, {gets_item} GETs")
        local_item = read_in_subprocess(str(dst), per_item=True)
        unpacked_local = read_in_subprocess(str(src))
        unpacked_item = read_in_subprocess(str(src), per_item=True)
        resume = listing(shards_for(IMAGENET)) if args.listing else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_epoch_files = 6
    per_item_objects = 6  # prob, index, tail_mass, tail_code, valid chunks + the done marker
    fixed_unpacked = objects_unpacked - per_item_objects * len(shards)
    fixed = objects_packed - per_epoch_files
    row_bytes = sum(f["size"] for k, f in manifest["files"].items() if "/c/" in k and not k.startswith("tail_")) / rows
    pack_rows_per_s = rows / pack_s

    def extrapolate(epochs: int, images: int) -> dict:
        n = epochs * images * VIEWS
        return {"epochs": epochs, "images": images, "rows": n,
                # per item one chunk of each row array + its done marker; + the metadata and tail basis
                "objects_unpacked": epochs * len(shards_for(images)) * per_item_objects + fixed_unpacked,
                "objects_packed": epochs * per_epoch_files + fixed,
                "bytes_packed": round(n * row_bytes), "pack_hours_one_node": round(n / pack_rows_per_s / 3600, 2)}

    result = {
        "mode": "quick" if args.quick else "imagenet",
        "machine": f"{platform.node()}: {os.cpu_count()} CPU cores shared with ~7 engineers' jobs (loaded), "
                   f"local disk; {platform.python_version()}",
        "samples": samples, "shards": len(shards), "epochs": 1, "views": VIEWS, "k": K, "tail_dim": D, "rows": rows,
        "objects_unpacked": objects_unpacked, "bytes_unpacked": bytes_unpacked,
        "objects_packed": objects_packed, "bytes_packed": bytes_packed,
        "bytes_per_row_packed": round(row_bytes, 2),
        "write_seconds": round(write_s, 1), "write_rows_per_s": round(rows / write_s),
        "pack_seconds": round(pack_s, 1), "pack_rows_per_s": round(pack_rows_per_s),
        "read_rows_per_s_local": round(local["rows_per_s"]), "read_rows_per_s_http": round(http["rows_per_s"]),
        "read_rows_per_s_local_per_item": round(local_item["rows_per_s"]),
        "read_rows_per_s_http_per_item": round(http_item["rows_per_s"]),
        "read_rows_per_s_unpacked_local": round(unpacked_local["rows_per_s"]),
        "read_rows_per_s_unpacked_local_per_item": round(unpacked_item["rows_per_s"]),
        "reader_peak_rss_mb": round(max(local["peak_rss_mb"], http["peak_rss_mb"])),
        "reader_rss_after_open_mb": round(http["rss_after_open_mb"]),
        "http_gets": gets, "http_gets_per_item": gets_item,
        "extrapolated": {"deit_imagenet_100_epochs": extrapolate(100, IMAGENET),
                         "imagenet22k_90_epochs": extrapolate(90, 13_000_000)},
        "resume_listing_moto": resume,
        "goals": {"objects_packed_max": 100, "read_rows_per_s_http_min": 200_000},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("extrapolated",)}, indent=1))
    print(json.dumps(result["extrapolated"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
