"""The teacher-target cache: a Zarr v3 group. The only module that knows the on-disk layout.

Layout (format_version 2)::

    <path>/zarr.json           group; attrs = caller provenance + format_version + kdcache_layout
    <path>/prob   uint8  [epochs, num_samples, views, k]   top-k probability codes (storage/encoding.py)
    <path>/index  uint16 [epochs, num_samples, views, k]   top-k class ids, sorted ascending, delta-coded
    <path>/valid  bool   [epochs, num_samples, views]      False = row missing (corrupt sample, ...)
    <path>/done   string [epochs, num_shards]              "" = not done; else JSON
                                                           {"rows": n_valid, "missing": [records]}

Chunks are (1, shard_size, views, k): since every shard holds exactly ``shard_size`` samples
(except the last), one (epoch, shard) work item owns whole chunks, so concurrent writers never
share a chunk (Zarr would silently lose one of the updates). The ``done`` chunk of an item is
written LAST, after its data, and also carries the item's missing-row records — one chunk per
item, never a shared attrs dict. A reader only trusts rows of done items.

No per-row augmentation seed is stored: row (epoch, sample_id, view) was produced from the
cache-level ``seed`` attribute by the plan's counter rule (seed, epoch, sample_id, view).
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from storage import encoding

FORMAT_VERSION = 2
LAYOUT_KEY = "kdcache_layout"


class CacheMismatchError(ValueError):
    """An existing cache differs from what the caller expects; the message names the field."""


class CacheNotReady(RuntimeError):
    """A (epoch, shard) work item has not been marked done yet."""

    def __init__(self, epoch: int, shard: int, path: str = ""):
        self.epoch, self.shard, self.path = epoch, shard, path
        super().__init__(f"cache {path}: epoch {epoch} shard {shard} is not done yet")


# ----------------------------------------------------------------------------- helpers
def _open_group(path: str | os.PathLike, mode: str) -> zarr.Group:
    """Open a group from a local path, ``file://`` URL, or any fsspec URL (``memory://``, ``s3://``)."""
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return zarr.open_group(path, mode=mode, zarr_format=3)


def _plain(value: Any) -> Any:
    """JSON round-trip so tuples/lists and numpy scalars compare like stored attrs."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _first_difference(expected: Any, found: Any, field: str) -> str | None:
    """Dotted name of the first field where two JSON values differ, or None."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in list(expected) + [k for k in found if k not in expected]:
            sub = f"{field}.{key}" if field else str(key)
            if key not in found or key not in expected:
                return sub
            diff = _first_difference(expected[key], found[key], sub)
            if diff:
                return diff
        return None
    return None if expected == found else field


def _dig(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part, "<absent>") if isinstance(node, dict) else "<absent>"
    return node


def _mismatch(path: str, field: str, expected: Any, found: Any) -> CacheMismatchError:
    # "expected" is always the caller's side (the run being started), "found" the stored one
    return CacheMismatchError(f"cache {path}: field {field}: expected {_short(expected)} (this run), "
                              f"found {_short(found)} (in the cache)")


def _shard_bounds(shards: Sequence[Any]) -> list[tuple[int, int]]:
    """(first_id, count) per shard from ShardInfo objects or pairs."""
    out = []
    for s in shards:
        out.append((int(s.first_id), int(s.count)) if hasattr(s, "first_id") else (int(s[0]), int(s[1])))
    return out


# ----------------------------------------------------------------------------- base
class _CacheBase:
    def __init__(self, group: zarr.Group, path: str):
        self.path = path
        self.group = group
        self.attrs: dict = dict(group.attrs)
        layout = self.attrs.get(LAYOUT_KEY)
        if layout is None or self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"cache {path}: field format_version: expected {FORMAT_VERSION}, "
                f"found {self.attrs.get('format_version', '<absent>')}")
        self.layout = layout
        self.epochs: int = layout["epochs"]
        self.views: int = layout["views"]
        self.k: int = layout["k"]
        self.num_classes: int = layout["num_classes"]
        self.num_samples: int = layout["num_samples"]
        self.shard_size: int = layout["shard_size"]
        self.shards: list[tuple[int, int]] = [tuple(s) for s in layout["shards"]]
        self.levels: int = layout["prob_levels"]
        self._prob = group["prob"]
        self._index = group["index"]
        self._valid = group["valid"]
        self._done = group["done"]
        self._done_known: set[tuple[int, int]] = set()

    def _check_item(self, epoch: int, shard_index: int) -> None:
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"cache {self.path}: epoch {epoch} out of range [0, {self.epochs})")
        if not 0 <= shard_index < len(self.shards):
            raise IndexError(f"cache {self.path}: shard {shard_index} out of range [0, {len(self.shards)})")

    def _done_record(self, epoch: int, shard_index: int) -> dict | None:
        raw = self._done[epoch, shard_index]
        text = str(raw.item() if hasattr(raw, "item") else raw)
        return json.loads(text) if text else None

    def is_done(self, epoch: int, shard_index: int) -> bool:
        """True once the item's done marker (written after its data) exists."""
        self._check_item(epoch, shard_index)
        if (epoch, shard_index) in self._done_known:
            return True
        if self._done_record(epoch, shard_index) is not None:
            self._done_known.add((epoch, shard_index))  # done never reverts
            return True
        return False

    def done_items(self) -> set[tuple[int, int]]:
        """All (epoch, shard_index) marked done, from one listing of the done chunks."""
        store_path = self._done.store_path
        prefix = f"{store_path.path}/c/" if store_path.path else "c/"

        async def _keys() -> list[str]:
            return [k async for k in store_path.store.list_prefix(prefix)]

        items = set()
        for key in sync(_keys()):
            parts = key[len(prefix):].split("/")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                items.add((int(parts[0]), int(parts[1])))
        # a chunk holding the fill value "" is never written by us, but be exact anyway
        items = {it for it in items if it in self._done_known or self._done_record(*it) is not None}
        self._done_known |= items
        return items

    def missing_records(self) -> list[dict]:
        """Missing-row records (shard, key, epoch, view, reason) of all done items."""
        out = []
        for epoch, shard in sorted(self.done_items()):
            out.extend((self._done_record(epoch, shard) or {}).get("missing", []))
        return out

    def bytes_on_disk(self, metadata: bool = True) -> int:
        """Bytes stored under the group (``metadata=False``: chunk bytes only, no zarr.json)."""
        store_path = self.group.store_path
        prefix = f"{store_path.path}/" if store_path.path else ""

        async def _total() -> int:
            total = 0
            async for key in store_path.store.list_prefix(prefix):
                if metadata or not key.endswith("zarr.json"):
                    total += await store_path.store.getsize(key)
            return total

        return sync(_total())


# ----------------------------------------------------------------------------- writer
class CacheWriter(_CacheBase):
    """Writes whole (epoch, shard) work items; see :func:`create_cache`."""

    def write_item(self, epoch: int, shard_index: int, sample_ids: np.ndarray, views: np.ndarray,
                   logprobs: np.ndarray, indices: np.ndarray, missing: Iterable[dict] = ()) -> None:
        """Write every row of one (epoch, shard) item, then its done marker LAST.

        Args:
            sample_ids, views: [n] row addresses; sample ids must lie in the shard.
            logprobs: [n, k] float top-k log-probs (logit - logsumexp), sorted descending.
            indices: [n, k] int class indices.
            missing: records (shard, key, epoch, view, reason) of rows not provided; every
                row of the item not in ``sample_ids``/``views`` is stored as invalid.
        """
        self._check_item(epoch, shard_index)
        first, count = self.shards[shard_index]
        sample_ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        views = np.asarray(views, dtype=np.int64).reshape(-1)
        logprobs = np.asarray(logprobs, dtype=np.float32)
        indices = np.asarray(indices)
        n = len(sample_ids)
        where = f"cache {self.path}: epoch {epoch} shard {shard_index}"
        if views.shape != (n,) or logprobs.shape != (n, self.k) or indices.shape != (n, self.k):
            raise ValueError(f"{where}: expected sample_ids/views [n] and logprobs/indices [n, {self.k}], found "
                             f"{sample_ids.shape}, {views.shape}, {logprobs.shape}, {indices.shape}")
        rows = sample_ids - first
        if n and (rows.min() < 0 or rows.max() >= count):
            bad = sample_ids[(rows < 0) | (rows >= count)][0]
            raise ValueError(f"{where}: sample_id {bad} is not in the shard [{first}, {first + count})")
        if n and (views.min() < 0 or views.max() >= self.views):
            raise ValueError(f"{where}: view out of range [0, {self.views}): {views.min()}..{views.max()}")
        if not np.isfinite(logprobs).all():
            bad = sample_ids[~np.isfinite(logprobs).all(axis=1)][0]
            raise ValueError(f"{where}: non-finite log-probs for sample_id {bad}")
        flat = rows * self.views + views
        if len(np.unique(flat)) != n:
            raise ValueError(f"{where}: duplicate (sample_id, view) rows")
        try:
            codes, gaps = encoding.encode_rows(logprobs, indices, self.num_classes, self.levels)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

        prob = np.zeros((count, self.views, self.k), np.uint8)
        index = np.zeros((count, self.views, self.k), np.uint16)
        valid = np.zeros((count, self.views), bool)
        prob[rows, views] = codes
        index[rows, views] = gaps
        valid[rows, views] = True
        # whole-chunk writes: zarr never reads-modifies-writes a chunk covered entirely
        self._prob[epoch, first:first + count] = prob
        self._index[epoch, first:first + count] = index
        self._valid[epoch, first:first + count] = valid
        record = {"rows": int(n), "missing": [_plain(dict(m)) for m in missing]}
        self._done[epoch, shard_index] = json.dumps(record, sort_keys=True)
        self._done_known.add((epoch, shard_index))


def create_cache(path: str | os.PathLike, *, shards: Sequence[Any], shard_size: int, num_samples: int,
                 epochs: int, views: int, k: int, num_classes: int, attrs: dict) -> CacheWriter:
    """Create the cache group (or reopen it for resume when its attrs are identical).

    Args:
        shards: ShardInfo list (or (first_id, count) pairs); every shard but the last must hold
            exactly ``shard_size`` samples, and first_id = index * shard_size.
        attrs: caller provenance (teacher, checkpoint_sha256, fingerprint, manifest_sha256, seed, ...).

    Raises:
        CacheMismatchError: the cache exists with different attrs or layout (names the field).
        ValueError: shards inconsistent with shard_size / num_samples.
    """
    path = os.fspath(path)
    bounds = _shard_bounds(shards)
    for i, (first, count) in enumerate(bounds):
        last = i == len(bounds) - 1
        if first != i * shard_size or count > shard_size or (not last and count != shard_size) or count < 1:
            raise ValueError(f"shard {i}: first_id {first}, count {count} do not follow shard_size {shard_size}")
    if sum(c for _, c in bounds) != num_samples:
        raise ValueError(f"shards hold {sum(c for _, c in bounds)} samples, num_samples is {num_samples}")
    if min(epochs, views, k, num_classes) < 1 or k > num_classes or num_classes > 65536:
        raise ValueError(f"bad layout: epochs {epochs}, views {views}, k {k}, num_classes {num_classes}")
    layout = {"epochs": epochs, "views": views, "k": k, "num_classes": num_classes, "num_samples": num_samples,
              "shard_size": shard_size, "shards": [list(b) for b in bounds], "encoding": encoding.ENCODING,
              "prob_levels": encoding.levels_for(k)}
    wanted = _plain({**attrs, "format_version": FORMAT_VERSION, LAYOUT_KEY: layout})

    group = _open_group(path, mode="a")
    if "done" in group:  # resume: everything must match
        found = _plain(dict(group.attrs))
        field = _first_difference(wanted, found, "")
        if field is not None:
            short = field.split(".", 1)[1] if field.startswith(LAYOUT_KEY + ".") else field
            raise _mismatch(path, short, _dig(wanted, field), _dig(found, field))
        return CacheWriter(group, path)

    group.attrs.put(wanted) if hasattr(group.attrs, "put") else group.attrs.update(wanted)
    rows = (epochs, num_samples, views)
    chunk = (1, shard_size, views)
    # row-major chunks (measured better than a rank-major transpose); see storage/encoding.py
    group.create_array("prob", shape=rows + (k,), chunks=chunk + (k,), dtype="uint8", fill_value=0,
                       compressors=[BloscCodec(cname="zstd", clevel=9, shuffle="noshuffle")])
    group.create_array("index", shape=rows + (k,), chunks=chunk + (k,), dtype="uint16", fill_value=0,
                       compressors=[BloscCodec(cname="zstd", clevel=9, shuffle="shuffle")])
    group.create_array("valid", shape=rows, chunks=chunk, dtype="bool", fill_value=False,
                       compressors=[BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle")])
    # created last: its presence means the group is complete (see the resume branch above)
    group.create_array("done", shape=(epochs, len(bounds)), chunks=(1, 1), dtype=str, fill_value="")
    return CacheWriter(group, path)


# ----------------------------------------------------------------------------- reader
class CacheReader(_CacheBase):
    """Vectorized lookups of cached rows.

    Decoded items are kept in compact rank-order form (uint8 codes, uint16 indices) inside
    one dense per-epoch buffer of ``num_samples * views`` rows, filled chunk by chunk on
    first use; ``cache_epochs`` epochs are kept (least recently used evicted), so a lookup
    is a few numpy gathers over the batch plus a 256-entry dequantization table. Memory:
    ``3k + 1`` bytes per row and epoch (ImageNet, 3 views, k=10: 119 MB per epoch), and
    ``np.zeros`` pages are only touched for loaded shards.
    """

    waited_s: float = 0.0  # seconds spent in wait_done, so throughput can leave them out

    def __init__(self, group: zarr.Group, path: str, cache_epochs: int = 2):
        super().__init__(group, path)
        self.cache_epochs = cache_epochs
        self._epochs: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lut = encoding.logprob_table(self.levels)

    def _epoch_buffer(self, epoch: int) -> dict[str, np.ndarray]:
        buf = self._epochs.get(epoch)
        if buf is None:
            rows, k = self.num_samples * self.views, self.k
            # np.zeros pages are allocated lazily: only loaded shards cost memory
            buf = {"codes": np.zeros((rows, k), np.uint8), "index": np.zeros((rows, k), np.uint16),
                   "valid": np.zeros(rows, bool), "loaded": np.zeros(len(self.shards), bool)}
            self._epochs[epoch] = buf
            while len(self._epochs) > self.cache_epochs:
                self._epochs.popitem(last=False)
        elif next(reversed(self._epochs)) != epoch:
            self._epochs.move_to_end(epoch)
        return buf

    def _load(self, epoch: int, shard_index: int, buf: dict[str, np.ndarray]) -> None:
        if not self.is_done(epoch, shard_index):
            raise CacheNotReady(epoch, shard_index, self.path)
        first, count = self.shards[shard_index]
        sl = slice(first, first + count)
        flat = slice(first * self.views, (first + count) * self.views)
        codes, index = encoding.decode_rows(self._prob[epoch, sl].reshape(-1, self.k),
                                            self._index[epoch, sl].reshape(-1, self.k))
        buf["codes"][flat], buf["index"][flat] = codes, index
        buf["valid"][flat] = self._valid[epoch, sl].reshape(-1)
        buf["loaded"][shard_index] = True

    def lookup(self, epoch: int, sample_ids: np.ndarray, views: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows (epoch, sample_ids[i], views[i]) -> (logprobs f32 [B,k], indices i64 [B,k], valid bool [B]).

        Log-probs are the dequantized values, sorted descending; among equal values the
        classes come in ascending id order (storage/encoding.py). Invalid rows (missing
        samples) come back with valid False and meaningless values.

        Raises:
            CacheNotReady: a needed (epoch, shard) item is not done (names epoch and shard).
        """
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"cache {self.path}: epoch {epoch} out of range [0, {self.epochs})")
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64)
        if sample_ids.size:
            if sample_ids.min() < 0 or sample_ids.max() >= self.num_samples:
                raise IndexError(f"cache {self.path}: sample_id out of range [0, {self.num_samples})")
            if views.min() < 0 or views.max() >= self.views:
                raise IndexError(f"cache {self.path}: view out of range [0, {self.views})")
        buf = self._epoch_buffer(epoch)
        loaded = buf["loaded"]
        if not loaded.all():
            shard = sample_ids // self.shard_size
            if not loaded[shard].all():
                for s in np.unique(shard[~loaded[shard]]):
                    self._load(epoch, int(s), buf)
        rows = sample_ids * self.views + views
        return (self._lut[buf["codes"][rows]], buf["index"][rows].astype(np.int64), buf["valid"][rows])

    def wait_done(self, epoch: int, shard_index: int, timeout: float | None = None, poll: float = 2.0,
                  log: Callable[[str], Any] | None = print) -> None:
        """Block until item (epoch, shard_index) is done, saying so while waiting.

        Raises:
            TimeoutError: not done within ``timeout`` seconds (names epoch and shard).
        """
        start = time.monotonic()
        last_log = None
        while not self.is_done(epoch, shard_index):
            now = time.monotonic()
            waited = now - start
            if timeout is not None and waited >= timeout:
                raise TimeoutError(f"cache {self.path}: epoch {epoch} shard {shard_index} not done after {waited:.0f}s")
            if log is not None and (last_log is None or now - last_log >= 30.0):
                log(f"waiting for teacher cache {self.path}: epoch {epoch} shard {shard_index} "
                    f"not done yet ({waited:.0f}s)")
                last_log = now
            time.sleep(poll if timeout is None else max(0.0, min(poll, timeout - waited)))
        self.waited_s += time.monotonic() - start


def open_cache(path: str | os.PathLike, expect: dict | None = None, cache_epochs: int = 2) -> CacheReader:
    """Open a cache for reading; refuse it when an ``expect`` field differs from its attrs.

    ``expect`` keys are looked up among the caller attrs first, then the layout
    (k, epochs, views, num_classes, num_samples, shard_size).

    Raises:
        CacheMismatchError: ``cache <path>: field k: expected 10, found 5``.
        FileNotFoundError: no cache at ``path``.
    """
    path = os.fspath(path)
    try:
        group = _open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise FileNotFoundError(f"no kdcache cache at {path}") from e
    reader = CacheReader(group, path, cache_epochs=cache_epochs)
    for field, expected in (expect or {}).items():
        found = reader.attrs[field] if field in reader.attrs else reader.layout.get(field, "<absent>")
        if _plain(expected) != _plain(found):
            raise _mismatch(path, field, expected, found)
    return reader


def wait_for_cache(path: str | os.PathLike, timeout: float | None = None, poll: float = 2.0,
                   log: Callable[[str], Any] | None = print) -> CacheReader:
    """Open the cache at ``path`` once the caching job has created it, saying what it waits for.

    For a student started together with the caching job (``cache.wait=true``): the job writes
    the group only after checking its inputs and building its teacher. A group without its
    ``done`` array is still being created and counts as absent.

    Raises:
        TimeoutError: no complete cache after ``timeout`` seconds.
    """
    path = os.fspath(path)
    start = time.monotonic()
    last_log = None
    while True:
        try:
            if "done" in _open_group(path, mode="r"):
                return open_cache(path)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            pass
        now = time.monotonic()
        waited = now - start
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"cache {path}: not created by the caching job after {waited:.0f}s "
                               f"(cache.timeout_s={timeout:g})")
        if log is not None and (last_log is None or now - last_log >= 30.0):
            log(f"waiting for the caching job to create {path} ({waited:.0f}s"
                + (f", timeout {timeout:g}s)" if timeout is not None else ", no timeout)"))
            last_log = now
        time.sleep(poll if timeout is None else max(0.0, min(poll, timeout - waited)))
