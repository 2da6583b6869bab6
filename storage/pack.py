"""Pack a finished cache for publishing: a read-only copy with a few files per (array, epoch).

    python -m storage.pack SRC DST [--epochs 0-1,4] [--audit audit.json]
    python -m storage.pack --verify DST

SRC and DST are local paths or fsspec URLs (``s3://``, ``gs://``, ``hf://``, ...). The unpacked
cache has one object per (array, epoch, shard) plus a done marker per item: ~900k objects for
DeiT's ImageNet schedule. The packed copy holds the same arrays, attrs and layout (so the
student's guard treats it like the original), written with Zarr v3's sharding codec:

* one shard file per (row array, epoch), its inner chunks still one (epoch, shard) item each,
  so a reader fetches the file's index (one suffix range request) and then only the items it
  needs (one range request each);
* crc32c on every inner chunk and on the shard index: a corrupted byte range is an error that
  names the file, epoch and shard (``storage.CacheCorruptError``), never a wrong target;
* the done records (missing rows, fidelity) in one chunk per epoch;
* consolidated metadata in the group's ``zarr.json``, so an HTTP reader needs no listing;
* ``README.md``, a generated card (provenance, size, fidelity, audit, commands);
* ``pack.json``, every file's size and sha256, written LAST: without it the copy is incomplete
  and readers refuse it.

Packing refuses a cache with items not done (naming them). It is resumable: each file written is
noted with its sha256 in ``pack.partial.json``; a re-run keeps the files whose bytes still match.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import zarr
import google_crc32c
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.cli import run_cli
from storage.cache import (PACK_MANIFEST, PACKED_KEY, CacheMismatchError, CacheReader, _first_difference, _open_group,
                           _plain, _spans, open_cache)

PACK_VERSION = 1
JOURNAL = "pack.partial.json"
CARD = "README.md"
ROW_ARRAYS = ("prob", "index", "tail_mass", "tail_code", "valid")  # per-row, sharded per epoch
TAIL_ARRAYS = ("tail_mean", "tail_step", "tail_basis")
EMPTY = {"empty": True}  # journal entry of a shard file zarr did not write (all its items are the fill value)


class CacheNotFinished(RuntimeError):
    """The source cache has (epoch, shard) items without done markers."""


def parse_epochs(text: str | None, epochs: int) -> list[int]:
    """``0-1,4`` -> [0, 1, 4]; None -> every epoch. Raises ValueError naming a bad part."""
    if text is None:
        return list(range(epochs))
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--epochs {text!r}: {part!r} is not N or N-M") from None
        if not 0 <= first <= last < epochs:
            raise ValueError(f"--epochs {text!r}: {part!r} is outside the cache's epochs 0-{epochs - 1}")
        out.update(range(first, last + 1))
    return sorted(out)


class _Files:
    """Whole-file reads and writes under a group's root, through its zarr store (any URL)."""

    def __init__(self, group: zarr.Group):
        self.store_path = group.store_path

    def _key(self, key: str) -> str:
        return f"{self.store_path.path}/{key}" if self.store_path.path else key

    def get(self, key: str) -> bytes | None:
        value = sync(self.store_path.store.get(self._key(key), prototype=default_buffer_prototype()))
        return None if value is None else value.to_bytes()

    def put(self, key: str, data: bytes) -> None:
        sync(self.store_path.store.set(self._key(key), default_buffer_prototype().buffer.from_bytes(data)))

    def delete(self, key: str) -> None:
        sync(self.store_path.store.delete(self._key(key)))

    def entry(self, key: str) -> dict | None:
        data = self.get(key)
        return None if data is None else {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check_finished(reader: CacheReader, epochs: list[int]) -> None:
    done = reader.done_items()
    missing = [(e, s) for e in epochs for s in range(len(reader.shards)) if (e, s) not in done]
    if missing:
        shown = ", ".join(f"(epoch {e}, shard {s})" for e, s in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CacheNotFinished(
            f"cache {reader.path}: not finished: {len(missing)} of {len(epochs) * len(reader.shards)} items of "
            f"epochs {_spans(epochs)} have no done marker: {shown}{more} (finish the caching job, or pack the "
            f"finished epochs with --epochs)")
    if not reader.has_tail():
        raise CacheNotFinished(f"cache {reader.path}: field tail_basis: the learned tail is not written yet")


def _crc32c(data: bytes) -> bytes:
    """The 4 bytes zarr's Crc32cCodec appends (little-endian uint32)."""
    return np.uint32(google_crc32c.value(data)).tobytes()


def _shard_file(src: zarr.Array, epoch: int, items: int) -> bytes:
    """The packed shard file of ``src``'s epoch: the source's compressed item chunks copied as they
    are (no decode, no recompression), each followed by its crc32c, then the index (offset, length
    per item; 2^64-1 for an item zarr stored no chunk for, i.e. all fill value) and its crc32c, as
    zarr's sharding codec (index at the end) writes and reads them."""
    store_path = src.store_path
    prototype = default_buffer_prototype()
    keys = [f"{store_path.path}/{src.metadata.encode_chunk_key((epoch, s) + (0,) * (src.ndim - 2))}"
            for s in range(items)]

    async def _get_all():
        return await asyncio.gather(*(store_path.store.get(key, prototype=prototype) for key in keys))

    parts, offset = [], 0
    index = np.full((items, 2), 2**64 - 1, dtype="<u8")
    for s, value in enumerate(sync(_get_all())):
        if value is None:
            continue
        raw = value.to_bytes()
        chunk = raw + _crc32c(raw)
        index[s] = (offset, len(chunk))
        parts.append(chunk)
        offset += len(chunk)
    table = index.tobytes()
    return b"".join(parts) + table + _crc32c(table)


def _create(dst: str, reader: CacheReader, epochs: list[int]) -> zarr.Group:
    """The packed group and its arrays (metadata only); an existing one must be the same pack."""
    attrs = _plain({**reader.group.attrs, PACKED_KEY: {"epochs": epochs, "pack_version": PACK_VERSION}})
    group = _open_group(dst, mode="a")
    if dict(group.attrs):
        field = _first_difference(attrs, _plain(dict(group.attrs)), "")
        if field is not None:
            raise CacheMismatchError(f"pack {dst}: field {field}: the destination holds another pack (other cache "
                                     f"or --epochs); pack into an empty destination")
    else:
        group.attrs.update(attrs)
    rows = (reader.epochs, len(reader.shards) * reader.slot, reader.views)
    for name in ROW_ARRAYS:
        if name not in reader.group or name in group:
            continue
        src = reader.group[name]
        # one shard = one (array, epoch); one inner chunk = one (epoch, shard) item, as unpacked, with
        # the source's codecs plus crc32c (so _shard_file can copy the compressed chunks as they are)
        group.create_array(name, shape=src.shape, chunks=src.chunks, shards=(1,) + rows[1:] + src.shape[3:],
                           dtype=src.dtype, fill_value=src.fill_value, serializer=src.serializer,
                           filters=src.filters,
                           compressors=list(src.compressors) + ([] if reader.packed else [Crc32cCodec()]))
    if "done" not in group:
        group.create_array("done", shape=(reader.epochs, len(reader.shards)), chunks=(1, len(reader.shards)),
                           dtype=str, fill_value="", compressors=[ZstdCodec(level=9), Crc32cCodec()],
                           config={"write_empty_chunks": True})
    for name in TAIL_ARRAYS:
        if name in reader.group and name not in group:
            src = reader.group[name]
            group.create_array(name, shape=src.shape, chunks=src.shape, dtype="float32", compressors=[Crc32cCodec()])
    return group


def _card(reader: CacheReader, dst: str, epochs: list[int], manifest: dict, audit: dict | None) -> str:
    """The cache card (README.md): what the cache is, how it was made, and how to train from it."""
    a, job = reader.attrs, reader.attrs.get("job", {})
    tail = f"learned, {reader.tail_dim} dims (storage/tail.py)" if reader.tail_dim else "uniform"
    rows = len(epochs) * reader.num_samples * reader.views
    lines = [
        f"# kdcache teacher cache: {a.get('teacher', '?')}", "",
        "Teacher targets (top-k log-probs, tail mass, tail codes) for every (epoch, sample, view) of a",
        "replayed DeiT-style augmentation plan, made by kdcache (`python -m teacher.cache`) and packed",
        "by `python -m storage.pack` (Zarr v3, sharding codec, crc32c on every chunk and shard index).", "",
        "| field | value |", "|---|---|",
        f"| teacher | `{a.get('teacher')}` |",
        f"| teacher weights sha256 | `{a.get('checkpoint_sha256')}` |",
        f"| data manifest sha256 | `{a.get('manifest_sha256')}` ({a.get('num_samples')} samples, "
        f"{len(reader.shards)} shards, {reader.num_classes} classes) |",
        f"| augmentation plan | seed {a.get('seed')}, fingerprint `{a.get('fingerprint')}` |",
        f"| plan config | `{json.dumps(a.get('aug'), sort_keys=True)}` |",
        f"| k | {reader.k} |",
        f"| tail | {tail} |",
        f"| epochs x views | {reader.epochs} x {reader.views} cached; this copy holds epochs {_spans(epochs)} "
        f"({rows:,} rows) |",
        f"| size | {manifest['bytes']:,} bytes in {manifest['objects']} files (+ pack.json) |",
        f"| kdcache version | {a.get('package_version')} |", "",
        "## Fidelity the caching job recorded", "",
    ]
    fid = reader.fidelity()
    if fid is None:
        lines.append("None recorded (the writer had no full logits).")
    else:
        lines += [f"Mean total variation between the full teacher distribution and the soft target rebuilt from "
                  f"the stored row, over {fid['rows']:,} rows:", "",
                  "| k | " + " | ".join(f"TV at τ={t:g}" for t in fid["taus"]) + " |",
                  "|---|" + "---|" * len(fid["taus"])]
        lines += [f"| {k} | " + " | ".join(f"{v:.4f}" for v in tv) + " |" for k, tv in zip(fid["ks"], fid["tv"])]
    lines += ["", "## Audit", ""]
    if audit is None:
        lines.append("No audit was given to the packer (`python -m teacher.audit CACHE --out audit.json`, "
                     "then `python -m storage.pack ... --audit audit.json`).")
    else:
        lines += ["Rows re-scored by the teacher from the replayed images (`python -m teacher.audit`):", "",
                  "| epoch | rows | top-1 agreement | max abs dp | invalid |", "|---|---|---|---|---|"]
        lines += [f"| {e} | {r['rows']} | {100 * r['top1_agree']:.2f} % | {r['max_abs_dp']:.2e} | {r['invalid']} |"
                  for e, r in audit.items()]
    missing = reader.missing_records()
    lines += ["", f"Rows stored as missing (samples the job could not decode): {len(missing)}.", "",
              "## Train a student from it", "",
              "The student replays the same augmentation from the data shards the manifest sha256 names",
              "and streams only the epochs its schedule reads (HTTP range requests); every read is checked.", "",
              "Any student config works (e.g. configs/student/deit_s_imagenet_hard.yaml); these overrides point it "
              "at this cache. `data.train` must hold shards whose manifest sha256 is the one above (the job read "
              f"`{job.get('shards', '?')}`); `run.epochs` = epochs x views reads every row once.", "",
              "```bash",
              "python -m student.train --config configs/student/deit_s_imagenet_hard.yaml \\",
              f"    cache.path={dst} data.train={job.get('shards', 'DATA/train')} data.val=DATA/val \\",
              f"    run.epochs={len(epochs) * reader.views} run.out=runs/student --dry-run   # the schedule, no GPU",
              "torchrun --nproc_per_node 8 -m student.train --config configs/student/deit_s_imagenet_hard.yaml \\",
              f"    cache.path={dst} data.train={job.get('shards', 'DATA/train')} data.val=DATA/val \\",
              f"    run.epochs={len(epochs) * reader.views} run.out=runs/student",
              "```", "",
              f"A student epoch reads one cache epoch's rows ({reader.views} views per sample), so "
              f"{len(epochs) * reader.views} student epochs read this copy once; more cycle through it.",
              "Check the whole copy against pack.json: `python -m storage.pack --verify " + dst + "`.", ""]
    return "\n".join(lines)


def pack(src: str, dst: str, epochs: str | None = None, audit: dict | str | None = None,
         log: Callable[[str], Any] | None = print) -> dict:
    """Pack the finished cache ``src`` into ``dst``; returns the manifest (``pack.json``).

    Args:
        epochs: which epochs (``0-1,4``; default all) the copy holds.
        audit: a ``python -m teacher.audit --out`` report (dict or path) for the card.

    Raises:
        CacheNotFinished: items of the chosen epochs lack done markers (names them).
        CacheMismatchError: ``dst`` holds another pack.
    """
    say = log or (lambda _msg: None)
    start = time.monotonic()
    reader = open_cache(src)
    chosen = parse_epochs(epochs, reader.epochs)
    if reader.held_epochs is not None and not set(chosen) <= reader.held_epochs:
        raise CacheMismatchError(f"cache {src}: field epochs: holds epochs {_spans(reader.held_epochs)}, asked for "
                                 f"{_spans(chosen)}")
    _check_finished(reader, chosen)
    if isinstance(audit, str):
        with open(audit) as f:
            audit = json.load(f)
    group = _create(dst, reader, chosen)
    files = _Files(group)
    done_before = files.get(PACK_MANIFEST)
    if done_before is not None:
        say(f"{dst}: already packed ({PACK_MANIFEST} present)")
        return json.loads(done_before)
    journal: dict = json.loads(files.get(JOURNAL) or b"{}")
    names = [n for n in ROW_ARRAYS if n in group] + ["done"]
    kept = written = 0
    for epoch in chosen:
        for name in names:
            dst_arr, src_arr = group[name], reader.group[name]
            key = f"{name}/{dst_arr.metadata.encode_chunk_key((epoch,) + (0,) * (dst_arr.ndim - 1))}"
            if key in journal and (files.entry(key) or EMPTY) == journal[key]:
                kept += 1
                continue
            if name == "done":  # JSON strings, re-encoded into one chunk per epoch
                dst_arr[epoch] = src_arr[epoch]
                # (an epoch whose chunks all hold the fill value gets no file: zarr writes none)
                journal[key] = files.entry(key) or EMPTY
            elif reader.packed is not None:  # a packed source (a subset of its epochs): the same file
                data = _Files(reader.group).get(key)
                if data is None or {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} \
                        != reader.pack_manifest["files"].get(key):
                    raise RuntimeError(f"pack {src}: file {key}: missing or not as its pack.json lists it")
                files.put(key, data)
                journal[key] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            else:
                data = _shard_file(src_arr, epoch, len(reader.shards))
                files.put(key, data)
                journal[key] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            files.put(JOURNAL, json.dumps(journal).encode())  # after the file: a noted file is whole
            written += 1
        say(f"packed epoch {epoch} ({len(names)} files)")
    for name in TAIL_ARRAYS:
        if name in group:
            group[name][...] = reader.group[name][...]
    with warnings.catch_warnings():  # "consolidated metadata is not in the v3 spec": zarr reads it, and we
        warnings.simplefilter("ignore")  # need it so that a reader over HTTP gets all metadata in one GET
        zarr.consolidate_metadata(group.store, path=group.path or None, zarr_format=3)
    data_keys = sorted(k for k, v in journal.items() if v != EMPTY) + [f"{n}/c/0" + "/0" * (group[n].ndim - 1) for n in TAIL_ARRAYS if n in group]
    meta_keys = ["zarr.json"] + [f"{n}/zarr.json" for n in names + [t for t in TAIL_ARRAYS if t in group]]
    entries = {key: files.entry(key) for key in meta_keys + data_keys}
    absent = [k for k, v in entries.items() if v is None]
    if absent:
        raise RuntimeError(f"pack {dst}: files {absent[:5]} are missing after writing them")
    manifest = {"kdcache_pack": PACK_VERSION, "epochs": chosen, "source_epochs": reader.epochs,
                "rows": len(chosen) * reader.num_samples * reader.views,
                "fingerprint": reader.attrs.get("fingerprint"), "files": entries,
                "empty": sorted(k for k, v in journal.items() if v == EMPTY)}  # all fill value: no file
    manifest["objects"] = len(entries) + 1  # + the card
    manifest["bytes"] = sum(e["size"] for e in entries.values())
    card = _card(reader, dst, chosen, manifest, audit).encode()
    files.put(CARD, card)
    entries[CARD] = files.entry(CARD)
    manifest["bytes"] += entries[CARD]["size"]
    manifest["seconds"] = round(time.monotonic() - start, 3)
    files.put(PACK_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())  # LAST: the copy is complete
    files.delete(JOURNAL)
    say(f"{dst}: packed epochs {_spans(chosen)} ({written} files written, {kept} kept from an earlier run), "
        f"{manifest['objects'] + 1} files, {manifest['bytes']:,} bytes")
    return manifest


def verify(path: str) -> dict:
    """Check every file of a packed copy against ``pack.json`` (size and sha256); returns the manifest.

    Raises:
        RuntimeError: no manifest, or a file missing or different (names the file).
    """
    files = _Files(_open_group(path, mode="r"))
    raw = files.get(PACK_MANIFEST)
    if raw is None:
        raise RuntimeError(f"pack {path}: field {PACK_MANIFEST}: absent (not a packed cache, or an incomplete one)")
    manifest = json.loads(raw)
    for key, want in manifest["files"].items():
        found = files.entry(key)
        if found != want:
            raise RuntimeError(f"pack {path}: file {key}: expected {want}, found {found or 'nothing'}")
    return manifest


PROG = "python -m storage.pack"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the finished cache (path or URL); with --verify, the packed copy")
    p.add_argument("dst", nargs="?", help="where the packed copy goes (path or URL)")
    p.add_argument("--epochs", default=None, help="epochs the copy holds, e.g. 0-1 or 0,2-3 (default all)")
    p.add_argument("--audit", default=None, help="a python -m teacher.audit --out report, for the card")
    p.add_argument("--verify", action="store_true", help="check a packed copy's files against its pack.json")
    args = p.parse_args(argv)
    if args.verify:
        manifest = verify(args.src)
        print(f"{args.src}: {len(manifest['files'])} files match {PACK_MANIFEST} (epochs {_spans(manifest['epochs'])})")
        return 0
    if args.dst is None:
        p.error("DST is required (or --verify)")
    pack(args.src, args.dst, epochs=args.epochs, audit=args.audit)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
