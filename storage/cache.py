"""The teacher-target cache: a Zarr v3 group. The only module that knows the on-disk layout.

Layout (format_version 4; S = slot, the largest shard's sample count)::

    <path>/zarr.json   group; attrs = caller provenance + format_version + kdcache_layout
    <path>/prob        uint16 [epochs, num_shards * S, views, k]  top-k probability codes (storage/encoding.py)
    <path>/index       uint16 [epochs, num_shards * S, views, k]  top-k class ids, sorted ascending, delta-coded
    <path>/tail_mass   uint16 [epochs, num_shards * S, views]     probability code of the tail mass
    <path>/valid       bool   [epochs, num_shards * S, views]     False = row missing (corrupt sample, padding)
    <path>/done        string [epochs, num_shards]                "" = not done; else JSON {"rows": n_valid,
                                                                  "missing": [records], "fidelity": {...}}
    with a learned tail (layout tail_dim > 0; storage/tail.py), written once by ``write_tail``
    before any item, so every row of the cache uses the same basis (also after a resume):
    <path>/tail_mean   float32 [C];  tail_step float32 [D];  tail_basis float32 [D, C] (written last)
    <path>/tail_code   int8   [epochs, num_shards * S, views, D]  per-row tail codes

The ``fidelity`` record of a done item holds the sums over (up to ``teacher.fidelity.FIDELITY_ROWS``) rows of
the TV and KL of the stored rebuild vs the full teacher distribution, for several k and τ, when
the caching job measured it (teacher/fidelity.py) and handed it to ``write_item``; readers get
the records and their means (storage/fidelity.py).

**Slots.** Shards may hold different numbers of samples (shards written by other tools), yet
one (epoch, shard) work item must own whole chunks: two writers in one chunk make Zarr silently
lose one of the updates (and the local store writes chunks atomically, a shared one could not
be). So every shard gets a slot of S rows, S = the largest shard's count, and chunks are
(1, S, views, k): sample ``sample_id`` of shard ``i`` (ids ``[first_i, first_i + count_i)``) lives in
row ``i * S + sample_id - first_i``; the rows past a shard's count are padding, never valid.
Readers map ids to rows with one ``searchsorted`` over the shards' first ids. Shards of equal
size (``make_shards``) pad only the last one. Format 3 stored rows at ``sample_id``; it is
refused (``format_version``), not misread. The ``done`` chunk of an item is
written LAST, after its data, and also carries the item's missing-row records — one chunk per
item, never a shared attrs dict. A reader only trusts rows of done items.

No per-row augmentation seed is stored: row (epoch, sample_id, view) was produced from the
cache-level ``seed`` attribute by the plan's counter rule (seed, epoch, sample_id, view).

**Packed caches** (storage/pack.py) hold the same arrays, attrs and layout, read only, with the
sharding codec: one file per (array, epoch), inner chunks still one item each, crc32c on every
inner chunk and shard index; the group attrs gain ``kdcache_packed`` ({"epochs": [...]}, the
epochs the copy holds) and ``pack.json`` lists every file's size and sha256 (written last). The
one :class:`CacheReader` serves both; on a packed cache every held item is done, an epoch it does
not hold is :class:`EpochNotInCache`, and a read that fails its checksum is
:class:`CacheCorruptError` naming the file, epoch and shard.
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from storage import encoding
from storage.fidelity import summarize
from storage.tail import TailModel
from storage.targets import TeacherTargets

FORMAT_VERSION = 4
LAYOUT_KEY = "kdcache_layout"
ROW_ARRAYS = ("prob", "index", "tail_mass", "tail_code", "valid", "done")  # per-row; the tail basis is per cache
PACKED_KEY = "kdcache_packed"   # group attr of a packed copy: {"epochs": [...]} (storage/pack.py)
PACK_MANIFEST = "pack.json"     # every file's size and sha256; written last, so it marks a complete pack


class CacheMismatchError(ValueError):
    """An existing cache differs from what the caller expects; the message names the field."""


class EncodedRows(NamedTuple):
    """Rows in stored form (:meth:`CacheWriter.encode`), row for row as given."""

    codes: np.ndarray            # [n, k] uint16 probability codes, ascending class order
    gaps: np.ndarray             # [n, k] uint16 class-index gaps
    log_tail: np.ndarray         # [n] log tail mass
    tail_codes: np.ndarray | None  # [n, D] int8 learned-tail codes, or None

    @staticmethod
    def concat(parts: Sequence["EncodedRows"]) -> "EncodedRows":
        return EncodedRows(*(None if parts[0][i] is None else np.concatenate([p[i] for p in parts])
                             for i in range(4)))


class EpochNotInCache(CacheMismatchError):
    """A packed cache holds a subset of the epochs and the caller asked for another one."""


class CacheCorruptError(RuntimeError):
    """Bytes read from a packed cache failed their crc32c (or the file is gone); names file, epoch, shard."""

    def __init__(self, path: str, file: str, epoch: int, shard: int, reason: str):
        self.file, self.epoch, self.shard = file, epoch, shard
        super().__init__(f"cache {path}: file {file}, epoch {epoch}, shard {shard}: {reason} "
                         f"(the copy is damaged; download it again or check it with python -m storage.pack --verify)")


class CacheNotReady(RuntimeError):
    """A (epoch, shard) work item has not been marked done yet."""

    def __init__(self, epoch: int, shard: int, path: str = ""):
        self.epoch, self.shard, self.path = epoch, shard, path
        super().__init__(f"cache {path}: epoch {epoch} shard {shard} is not done yet")


# optional packages of the URL protocols a published cache is read from (kdcache ships s3fs and aiohttp)
PROTOCOL_PACKAGES = {"hf": "huggingface_hub", "gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "http": "aiohttp",
                     "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}


# ----------------------------------------------------------------------------- helpers
def _open_group(path: str | os.PathLike, mode: str) -> zarr.Group:
    """Open a group from a local path, ``file://`` URL, or any fsspec URL (``memory://``, ``s3://``).

    Credentials and endpoints come from the environment and fsspec's configuration (e.g.
    ``FSSPEC_S3_ENDPOINT_URL``), never from kdcache configs. Directory listings are not cached:
    other processes (the job's actors, a resumed job) add chunks and done markers all the time,
    and a cached listing would hide them (s3fs then reports a listed key as missing).
    """
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" not in path:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3, storage_options={"use_listings_cache": False})
    except ImportError as e:  # fsspec imports a protocol's package on first use
        protocol = path.split("://", 1)[0]
        package = PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ImportError(f"cache {path}: reading {protocol}:// needs {package} (pip install {package}): {e}") from e


class _PackedStore(WrapperStore):
    """A packed cache's store: a file ``pack.json`` lists but the server lacks is an error (zarr
    would silently read the fill value), and shard indexes (suffix reads) are kept once read, so a
    reader fetches each file's index once, then only the inner chunks it needs."""

    def __init__(self, store, files: frozenset = frozenset()):
        super().__init__(store)
        self._files = files
        self._indexes: dict[tuple[str, int], Any] = {}

    def _with_store(self, store):
        return type(self)(store, self._files)

    async def get(self, key, prototype, byte_range=None):
        suffix = byte_range.suffix if isinstance(byte_range, SuffixByteRequest) else None
        if suffix is not None and (key, suffix) in self._indexes:
            return self._indexes[(key, suffix)]
        value = await self._store.get(key, prototype, byte_range)
        if value is None and key in self._files:
            raise FileNotFoundError(f"{key} is listed in {PACK_MANIFEST} but missing")
        if suffix is not None and value is not None:
            self._indexes[(key, suffix)] = value
        return value


def _read_key(group: zarr.Group, key: str) -> bytes | None:
    """The bytes of a file under the group's root (None when absent)."""
    store_path = group.store_path
    full = f"{store_path.path}/{key}" if store_path.path else key
    value = sync(store_path.store.get(full, prototype=default_buffer_prototype()))
    return None if value is None else value.to_bytes()


def _open_packed(group: zarr.Group, path: str) -> tuple[zarr.Group, dict]:
    """Reopen a packed group on a :class:`_PackedStore`; refuse a copy without its manifest."""
    raw = _read_key(group, PACK_MANIFEST)
    if raw is None:
        raise _incomplete_pack(path)
    manifest = json.loads(raw)
    store_path = group.store_path
    prefix = f"{store_path.path}/" if store_path.path else ""
    files = frozenset(prefix + key for key in manifest["files"])
    packed = zarr.open_group(store=_PackedStore(store_path.store, files), path=store_path.path, mode="r",
                             zarr_format=3)
    return packed, manifest


def _incomplete_pack(path: str) -> RuntimeError:
    return RuntimeError(f"cache {path}: field {PACK_MANIFEST}: absent, so this packed copy is incomplete "
                        f"(python -m storage.pack was interrupted or is still running; run it again)")


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


def _spans(epochs: Iterable[int]) -> str:
    """``0-1,4`` for {0, 1, 4} (the --epochs notation of storage/pack.py)."""
    out: list[str] = []
    for e in sorted(epochs):
        if out and int(out[-1].rsplit("-", 1)[-1]) == e - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{e}"
        else:
            out.append(str(e))
    return ",".join(out)


def _shard_bounds(shards: Sequence[Any]) -> list[tuple[int, int]]:
    """(first_id, count) per shard from ShardInfo objects or pairs; ids must be contiguous."""
    out = []
    for i, s in enumerate(shards):
        first, count = (int(s.first_id), int(s.count)) if hasattr(s, "first_id") else (int(s[0]), int(s[1]))
        expected = out[-1][0] + out[-1][1] if out else 0
        if first != expected or count < 1:
            raise ValueError(f"shard {i}: first_id {first}, count {count}: expected first_id {expected} "
                             f"(the counts of the shards before it) and a count >= 1")
        out.append((first, count))
    if not out:
        raise ValueError("no shards")
    return out


# ----------------------------------------------------------------------------- base
class CachedRows(NamedTuple):
    """Rows as a reader returns them (see :meth:`CacheReader.lookup_rows`)."""

    logprobs: np.ndarray      # float32 [B, k], dequantized, sorted descending
    indices: np.ndarray       # int64 [B, k]
    valid: np.ndarray         # bool [B]
    log_tail: np.ndarray      # float32 [B], dequantized log tail mass at τ=1
    tail_code: np.ndarray | None  # int8 [B, D] with a learned tail, else None


class _CacheBase:
    def __init__(self, group: zarr.Group, path: str):
        self.path = path
        self.attrs: dict = dict(group.attrs)
        # a packed copy (storage/pack.py): read only, the held epochs all done, pack.json its file list
        self.packed: dict | None = self.attrs.pop(PACKED_KEY, None)
        self.pack_manifest: dict | None = None
        self.held_epochs: frozenset[int] | None = None
        if self.packed is not None:
            group, self.pack_manifest = _open_packed(group, path)
            self.held_epochs = frozenset(int(e) for e in self.packed["epochs"])
            self._done_epochs: dict[int, np.ndarray] = {}
        self.group = group
        layout = self.attrs.get(LAYOUT_KEY)
        if layout is None or self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"cache {path}: field format_version: expected {FORMAT_VERSION}, "
                f"found {self.attrs.get('format_version', '<absent>')} (a cache written by another kdcache "
                f"version; re-create it with python -m teacher.cache)")
        self.layout = layout
        self.epochs: int = layout["epochs"]
        self.views: int = layout["views"]
        self.k: int = layout["k"]
        self.num_classes: int = layout["num_classes"]
        self.num_samples: int = layout["num_samples"]
        self.slot: int = layout["slot"]
        self.shards: list[tuple[int, int]] = [tuple(s) for s in layout["shards"]]
        self._firsts = np.array([first for first, _ in self.shards], np.int64)
        self.tail_dim: int = layout["tail_dim"]
        self._prob = group["prob"]
        self._index = group["index"]
        self._tail_mass = group["tail_mass"]
        self._valid = group["valid"]
        self._done = group["done"]
        self._done_known: set[tuple[int, int]] = set()
        self._tail = None

    def tail_model(self):
        """The cache's :class:`storage.tail.TailModel`, or None for a uniform tail.

        Raises:
            RuntimeError: the layout asks for a learned tail whose basis is not written yet.
        """
        if self.tail_dim == 0:
            return None
        if self._tail is None:
            if "tail_basis" not in self.group:  # written last by write_tail
                raise RuntimeError(f"cache {self.path}: field tail_basis: the tail basis is not written yet "
                                   f"(the caching job calibrates it before the first item)")
            self._tail = TailModel(*(self.group[name][:] for name in ("tail_mean", "tail_basis", "tail_step")))
        return self._tail

    def _read_packed(self, array: zarr.Array, epoch: int, shard: int, selection: tuple) -> np.ndarray:
        """``array[selection]`` of a packed copy; a failed checksum or a missing file is a
        :class:`CacheCorruptError` naming the file (epoch, shard)."""
        key = array.metadata.encode_chunk_key((epoch,) + (0,) * (array.ndim - 1))
        try:
            return array[selection]
        except (ValueError, RuntimeError, OSError) as e:
            raise CacheCorruptError(self.path, f"{array.name.lstrip('/')}/{key}", epoch, shard, str(e)) from e

    def has_tail(self) -> bool:
        """True when no learned tail is needed or its basis is written."""
        return self.tail_dim == 0 or self._tail is not None or "tail_basis" in self.group

    def fidelity_records(self) -> list[dict]:
        """The fidelity records of the done items that have one, in (epoch, shard) order, as the
        caching job wrote them (storage/fidelity.py)."""
        return [rec["fidelity"] for it in sorted(self.done_items())
                if "fidelity" in (rec := self._done_record(*it) or {})]

    def fidelity(self) -> dict | None:
        """Mean TV/KL of the stored rebuild vs the full teacher over all recorded rows of done items
        (storage.fidelity.summarize of :meth:`fidelity_records`), or None when no item recorded any."""
        return summarize(self.fidelity_records())

    def row_slots(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, storage row) of each sample id: row = shard x slot + position in the shard."""
        shard = np.searchsorted(self._firsts, sample_ids, side="right") - 1
        return shard, shard * self.slot + sample_ids - self._firsts[shard]

    def _check_item(self, epoch: int, shard_index: int) -> None:
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"cache {self.path}: epoch {epoch} out of range [0, {self.epochs})")
        if not 0 <= shard_index < len(self.shards):
            raise IndexError(f"cache {self.path}: shard {shard_index} out of range [0, {len(self.shards)})")
        self._check_held(epoch)

    def _check_held(self, epoch: int) -> None:
        if self.held_epochs is not None and epoch not in self.held_epochs:
            raise EpochNotInCache(
                f"cache {self.path}: field epochs: epoch {epoch} is not in this packed copy, which holds epochs "
                f"{_spans(self.held_epochs)} of {self.epochs} (pack the epochs the run reads with "
                f"python -m storage.pack --epochs, or train for fewer epochs)")

    def _done_record(self, epoch: int, shard_index: int) -> dict | None:
        if self.packed is not None:  # one done chunk per epoch: read it once
            if epoch not in self._done_epochs:
                self._done_epochs[epoch] = self._read_packed(self._done, epoch, shard_index, (epoch,))
            raw = self._done_epochs[epoch][shard_index]
        else:
            raw = self._done[epoch, shard_index]
        text = str(raw.item() if hasattr(raw, "item") else raw)
        return json.loads(text) if text else None

    def is_done(self, epoch: int, shard_index: int) -> bool:
        """True once the item's done marker (written after its data) exists."""
        self._check_item(epoch, shard_index)
        if self.packed is not None:  # packing refuses unfinished items: every held one is done
            return True
        if (epoch, shard_index) in self._done_known:
            return True
        if self._done_record(epoch, shard_index) is not None:
            self._done_known.add((epoch, shard_index))  # done never reverts
            return True
        return False

    def done_items(self) -> set[tuple[int, int]]:
        """All (epoch, shard_index) marked done, from one listing of the done chunks (a packed copy:
        its held epochs, without listing)."""
        if self.held_epochs is not None:
            return {(e, s) for e in self.held_epochs for s in range(len(self.shards))}
        store_path = self._done.store_path
        prefix = f"{store_path.path}/c/" if store_path.path else "c/"

        async def _keys() -> list[str]:
            return [k async for k in store_path.store.list_prefix(prefix)]

        items = set()
        for key in sync(_keys()):
            parts = key[len(prefix):].split("/")
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                items.add((int(parts[0]), int(parts[1])))
        # The listing alone is exact: a marker chunk exists only once write_item stored a non-empty
        # record (zarr writes no chunk holding the fill value ""). Reading every marker back cost one
        # GET each: 34 s per 1282 markers on moto, ~47 min for DeiT's 100 epochs (bench/scale.py).
        self._done_known |= items
        return items

    def missing_records(self) -> list[dict]:
        """Missing-row records (shard, key, epoch, view, reason) of all done items."""
        out = []
        for epoch, shard in sorted(self.done_items()):
            out.extend((self._done_record(epoch, shard) or {}).get("missing", []))
        return out

    def bytes_on_disk(self, metadata: bool = True, arrays: Sequence[str] | None = None) -> int:
        """Bytes stored under the group (``metadata=False``: chunk bytes only, no zarr.json;
        ``arrays``: only under these array names, e.g. the per-row ones without the tail basis).
        A packed copy answers from its manifest, without listing."""
        if self.pack_manifest is not None:
            return sum(f["size"] for key, f in self.pack_manifest["files"].items()
                       if (arrays is None or key.split("/", 1)[0] in arrays)
                       and (metadata or not key.endswith("zarr.json")) and key.split("/", 1)[0] != "README.md")
        store_path = self.group.store_path
        prefix = f"{store_path.path}/" if store_path.path else ""

        async def _total() -> int:
            total = 0
            async for key in store_path.store.list_prefix(prefix):
                if arrays is not None and key[len(prefix):].split("/", 1)[0] not in arrays:
                    continue
                if metadata or not key.endswith("zarr.json"):
                    total += await store_path.store.getsize(key)
            return total

        return sync(_total())


# ----------------------------------------------------------------------------- writer
class CacheWriter(_CacheBase):
    """Writes whole (epoch, shard) work items; see :func:`create_cache`."""

    def write_tail(self, tail) -> None:
        """Store the learned tail (a ``storage.tail.TailModel``) once, before any item is written.

        Raises:
            CacheMismatchError: a tail is already stored (a resumed job reuses it), or the model
                does not fit the layout (names the field).
        """
        if self.tail_dim == 0:
            raise CacheMismatchError(f"cache {self.path}: field tail_dim: the layout has no learned tail")
        if "tail_basis" in self.group:
            raise CacheMismatchError(f"cache {self.path}: field tail_basis: already written; a resumed job reuses it")
        if tail.num_classes != self.num_classes or not 0 <= tail.dim <= self.tail_dim:
            raise CacheMismatchError(f"cache {self.path}: field tail_basis: expected [<= {self.tail_dim}, "
                                     f"{self.num_classes}], found {list(tail.basis.shape)}")
        rows, chunk = (self.epochs, len(self.shards) * self.slot, self.views), (1, self.slot, self.views)
        self.group.create_array("tail_code", shape=rows + (tail.dim,), chunks=chunk + (max(tail.dim, 1),), dtype="int8",
                                fill_value=0, compressors=[BloscCodec(cname="zstd", clevel=9, shuffle="noshuffle")])
        for name, value in (("tail_mean", tail.mean), ("tail_step", tail.step), ("tail_basis", tail.basis)):
            arr = self.group.create_array(name, shape=value.shape, dtype="float32",
                                          chunks=tuple(max(n, 1) for n in value.shape))
            arr[...] = np.asarray(value, np.float32)  # tail_basis last: its presence means the tail is complete
        self._tail = None
        self.tail_model()

    def write_item(self, epoch: int, shard_index: int, sample_ids: np.ndarray, views: np.ndarray,
                   logprobs: np.ndarray, indices: np.ndarray, missing: Iterable[dict] = (),
                   logits: np.ndarray | None = None, encoded: Callable[[], tuple] | None = None,
                   fidelity: dict | None = None) -> None:
        """Write every row of one (epoch, shard) item, then its done marker LAST.

        Args:
            sample_ids, views: [n] row addresses; sample ids must lie in the shard.
            logprobs: [n, k] float top-k log-probs (logit - logsumexp), sorted descending.
            indices: [n, k] int class indices.
            missing: records (shard, key, epoch, view, reason) of rows not provided; every
                row of the item not in ``sample_ids``/``views`` is stored as invalid.
            logits: [n, C] full teacher logits. They give the exact tail mass and the tail codes
                (required with a learned tail); without them the tail mass is ``1 - Σ exp(logprobs)``.
            encoded: the rows already encoded, so that the caller can do it while its teacher
                scores (``teacher.work``): a callable returning (:class:`EncodedRows` of these
                rows in this order, the item's fidelity record or None), the first exactly what
                :meth:`encode` gives. Called after the checks; without it the rows are encoded here.
            fidelity: the item's fidelity record (without ``encoded``, which returns it), stored in
                its done marker: the caching job measures it on the first ``teacher.fidelity.FIDELITY_ROWS`` rows
                against :meth:`stored` (``teacher.fidelity.item_record``); None records none.
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
        if logits is not None and np.shape(logits) != (n, self.num_classes):
            raise ValueError(f"{where}: field logits: expected [{n}, {self.num_classes}], found {list(np.shape(logits))}")
        if logits is None and self.tail_dim:
            raise ValueError(f"{where}: {self._logits_needed()}")
        rows = sample_ids - first
        if n and (rows.min() < 0 or rows.max() >= count):
            bad = sample_ids[(rows < 0) | (rows >= count)][0]
            raise ValueError(f"{where}: sample_id {bad} is not in the shard [{first}, {first + count})")
        if n and (views.min() < 0 or views.max() >= self.views):
            raise ValueError(f"{where}: view out of range [0, {self.views}): {views.min()}..{views.max()}")
        for name, values in (("log-probs", logprobs), ("logits", logits)):
            if values is not None and not np.isfinite(values).all():
                bad = sample_ids[~np.isfinite(values).all(axis=1)][0]
                raise ValueError(f"{where}: non-finite {name} for sample_id {bad}")
        flat = rows * self.views + views
        if len(np.unique(flat)) != n:
            raise ValueError(f"{where}: duplicate (sample_id, view) rows")
        try:
            if encoded is not None:
                rows_out, fidelity = encoded()
            else:
                rows_out = self.encode(logprobs, indices, logits)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        codes, gaps, log_tail, tail_codes = rows_out
        tail = self.tail_model()

        slot, lo = self.slot, shard_index * self.slot
        prob = np.zeros((slot, self.views, self.k), np.uint16)
        index = np.zeros((slot, self.views, self.k), np.uint16)
        mass = np.zeros((slot, self.views), np.uint16)
        valid = np.zeros((slot, self.views), bool)
        prob[rows, views] = codes
        index[rows, views] = gaps
        mass[rows, views] = encoding.encode_probs(log_tail)
        valid[rows, views] = True
        # whole-chunk writes (the item's slot, padding included): zarr never reads-modifies-writes
        # a chunk covered entirely
        self._prob[epoch, lo:lo + slot] = prob
        self._index[epoch, lo:lo + slot] = index
        self._tail_mass[epoch, lo:lo + slot] = mass
        if tail is not None:
            code = np.zeros((slot, self.views, tail.dim), np.int8)
            code[rows, views] = tail_codes
            self.group["tail_code"][epoch, lo:lo + slot] = code
        self._valid[epoch, lo:lo + slot] = valid
        record = {"rows": int(n), "missing": [_plain(dict(m)) for m in missing]}
        if fidelity is not None:
            record["fidelity"] = fidelity
        self._done[epoch, shard_index] = json.dumps(record, sort_keys=True)
        self._done_known.add((epoch, shard_index))

    def _logits_needed(self) -> str:
        return f"field logits: the cache codes a learned tail (tail_dim {self.tail_dim}), which needs the full logits"

    def encode(self, logprobs: np.ndarray, indices: np.ndarray, logits: np.ndarray | None = None) -> EncodedRows:
        """Rows in stored form, row by row (any rows of an item, any batch of them): top-k codes and
        gaps, the log tail mass (exact from ``logits``, else ``1 - Σ exp(logprobs)``) and, with a
        learned tail, its codes. Raises ValueError on a bad class index or missing logits."""
        codes, gaps = encoding.encode_rows(logprobs, indices, self.num_classes)
        tail = self.tail_model()
        if logits is None:
            if self.tail_dim:
                raise ValueError(self._logits_needed())
            mass = 1.0 - np.exp(np.asarray(logprobs, np.float64)).sum(axis=1)
            return EncodedRows(codes, gaps, np.log(np.maximum(mass, 0.0)), None)
        z = torch.from_numpy(np.asarray(logits, np.float32))
        full = torch.log_softmax(z.double(), dim=-1)
        top = torch.from_numpy(np.asarray(indices).astype(np.int64))
        log_tail = torch.logsumexp(full.scatter(1, top, -torch.inf), dim=-1).numpy()
        return EncodedRows(codes, gaps, log_tail, tail.encode(z).numpy() if tail is not None else None)

    def stored(self, targets):
        """What ``targets`` (a ``storage.targets.TeacherTargets`` of this cache's classes) rebuild to
        once stored: the quantization round trip of storage/encoding.py, row for row. The caching
        job measures the fidelity of the stored rows with it (teacher/fidelity.py)."""
        no_tail = targets.log_tail is None  # k = C
        log_tail = np.zeros(len(targets.logprobs)) if no_tail else targets.log_tail.numpy()
        lp, idx, lt = encoding.round_trip(targets.logprobs.numpy(), targets.indices.numpy(), log_tail,
                                          self.num_classes)
        if no_tail:
            return TeacherTargets(torch.from_numpy(lp), torch.from_numpy(idx))
        return TeacherTargets(torch.from_numpy(lp), torch.from_numpy(idx), torch.from_numpy(lt), targets.tail_shape)


def create_cache(path: str | os.PathLike, *, shards: Sequence[Any], epochs: int, views: int, k: int,
                 num_classes: int, attrs: dict, tail_dim: int = 0) -> CacheWriter:
    """Create the cache group (or reopen it for resume when its attrs are identical).

    Args:
        shards: ShardInfo list (or (first_id, count) pairs) in shard order: ids contiguous from 0,
            any count >= 1 (each shard gets a slot of the largest count, see the module docstring).
        attrs: caller provenance (teacher, checkpoint_sha256, fingerprint, manifest_sha256, seed, ...).
        tail_dim: largest learned-tail basis (storage/tail.py); 0 = uniform tail. With a learned
            tail, :meth:`CacheWriter.write_tail` must run before the first item.

    Raises:
        CacheMismatchError: the cache exists with different attrs or layout (names the field).
        ValueError: shard ids not contiguous, or an empty shard.
    """
    path = os.fspath(path)
    bounds = _shard_bounds(shards)
    slot, num_samples = max(c for _, c in bounds), sum(c for _, c in bounds)
    if min(epochs, views, k, num_classes) < 1 or k > num_classes or num_classes > 65536 or tail_dim < 0:
        raise ValueError(f"bad layout: epochs {epochs}, views {views}, k {k}, num_classes {num_classes}, "
                         f"tail_dim {tail_dim}")
    layout = {"epochs": epochs, "views": views, "k": k, "num_classes": num_classes, "num_samples": num_samples,
              "slot": slot, "shards": [list(b) for b in bounds], "encoding": encoding.ENCODING,
              "tail_dim": min(tail_dim, num_classes - 1) if k < num_classes else 0}  # k = C: no tail
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
    rows = (epochs, len(bounds) * slot, views)
    chunk = (1, slot, views)  # one item = one chunk (its slot)
    # row-major chunks (measured better than a rank-major transpose); see storage/encoding.py
    for name, shape in (("prob", rows + (k,)), ("index", rows + (k,)), ("tail_mass", rows)):
        group.create_array(name, shape=shape, chunks=chunk + shape[3:], dtype="uint16", fill_value=0,
                           compressors=[BloscCodec(cname="zstd", clevel=9, shuffle="shuffle")])
    group.create_array("valid", shape=rows, chunks=chunk, dtype="bool", fill_value=False,
                       compressors=[BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle")])
    # created last: its presence means the group is complete (see the resume branch above)
    group.create_array("done", shape=(epochs, len(bounds)), chunks=(1, 1), dtype=str, fill_value="")
    return CacheWriter(group, path)


# ----------------------------------------------------------------------------- reader
class CacheReader(_CacheBase):
    """Vectorized lookups of cached rows.

    Decoded items are kept in compact rank-order form (uint16 codes and indices, uint16 tail
    mass, int8 tail codes) inside one dense per-epoch buffer of ``num_shards * slot * views`` rows
    (the storage rows, padding included), filled chunk by chunk on first use; ``cache_epochs`` epochs are kept (least recently used
    evicted), so a lookup is a few numpy gathers over the batch plus a dequantization table.
    Memory: ``4k + 3 + D`` bytes per row and epoch (ImageNet, 3 views, k=10, D=64: 411 MB per
    epoch), and ``np.zeros`` pages are only touched for loaded shards.
    """

    waited_s: float = 0.0  # seconds spent in wait_done, so throughput can leave them out

    def __init__(self, group: zarr.Group, path: str, cache_epochs: int = 2):
        super().__init__(group, path)
        self.cache_epochs = cache_epochs
        self._epochs: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lut = encoding.logprob_table()

    def _epoch_buffer(self, epoch: int) -> dict[str, np.ndarray]:
        buf = self._epochs.get(epoch)
        if buf is None:
            rows, k = len(self.shards) * self.slot * self.views, self.k
            tail = self.tail_model()
            # np.zeros pages are allocated lazily: only loaded shards cost memory
            buf = {"codes": np.zeros((rows, k), np.uint16), "index": np.zeros((rows, k), np.uint16),
                   "tail_mass": np.zeros(rows, np.uint16), "valid": np.zeros(rows, bool),
                   "loaded": np.zeros(len(self.shards), bool)}
            if tail is not None:
                buf["tail_code"] = np.zeros((rows, tail.dim), np.int8)
            self._epochs[epoch] = buf
            while len(self._epochs) > self.cache_epochs:
                self._epochs.popitem(last=False)
        elif next(reversed(self._epochs)) != epoch:
            self._epochs.move_to_end(epoch)
        return buf

    def _load(self, epoch: int, shard_index: int, buf: dict[str, np.ndarray]) -> None:
        if not self.is_done(epoch, shard_index):
            raise CacheNotReady(epoch, shard_index, self.path)
        self._load_block(epoch, shard_index, shard_index + 1, buf)

    def preload(self, epoch: int, shards: Iterable[int] | None = None, block: int | None = None) -> None:
        """Load the items ``(epoch, s)`` for ``s`` in ``shards`` (default all) not loaded yet, with one
        read per array per run of adjacent shards (at most ``block`` of them; None = the whole run)
        instead of one per item. On a packed copy a whole epoch is then one GET per file (an
        ImageNet epoch over HTTP on 127.0.0.1: 254k rows/s, 11 GETs, but ~310 MB more peak memory
        for the decoded copy than ``block=128``: 135k rows/s, 6421 range GETs; bench/scale.py);
        a part is the shard's index once, then one range per item. A failed read is retried item
        by item, so an error names the exact (file, epoch, shard).

        Raises:
            CacheNotReady: an item is not done (names epoch and shard).
        """
        self._check_held(epoch)
        buf = self._epoch_buffer(epoch)
        wanted = np.arange(len(self.shards)) if shards is None else np.unique(np.asarray(list(shards), np.int64))
        todo = wanted[~buf["loaded"][wanted]]
        for s in todo:
            if not self.is_done(epoch, int(s)):
                raise CacheNotReady(epoch, int(s), self.path)
        runs = np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1) if len(todo) else []
        for run in runs:
            step = len(run) if block is None else block
            for i in range(0, len(run), step):
                first, last = int(run[i]), int(run[min(i + step, len(run)) - 1])
                try:
                    self._load_block(epoch, first, last + 1, buf)
                except CacheCorruptError:
                    for s in range(first, last + 1):
                        self._load(epoch, s, buf)
                    raise

    def _load_block(self, epoch: int, first: int, stop: int, buf: dict[str, np.ndarray]) -> None:
        """Shards [first, stop) of an epoch, whole slots (padding rows are never valid)."""
        sl = slice(first * self.slot, stop * self.slot)
        flat = slice(sl.start * self.views, sl.stop * self.views)
        if self.packed is not None:
            def read(array: zarr.Array) -> np.ndarray:
                return self._read_packed(array, epoch, first, (epoch, sl))
        else:
            def read(array: zarr.Array) -> np.ndarray:
                return array[epoch, sl]
        codes, index = encoding.decode_rows(read(self._prob).reshape(-1, self.k), read(self._index).reshape(-1, self.k))
        buf["codes"][flat], buf["index"][flat] = codes, index
        buf["tail_mass"][flat] = read(self._tail_mass).reshape(-1)
        if "tail_code" in buf:
            buf["tail_code"][flat] = read(self.group["tail_code"]).reshape(flat.stop - flat.start, -1)
        buf["valid"][flat] = read(self._valid).reshape(-1)
        buf["loaded"][first:stop] = True

    def lookup_rows(self, epoch: int, sample_ids: np.ndarray, views: np.ndarray) -> CachedRows:
        """Rows (epoch, sample_ids[i], views[i]) with everything the soft rebuild needs.

        Log-probs are the dequantized values, sorted descending; among equal values the
        classes come in ascending id order (storage/encoding.py). Invalid rows (missing
        samples) come back with valid False and meaningless values. ``tail_code`` turns into
        the tail shape with :meth:`tail_model` (storage/tail.py).

        Raises:
            CacheNotReady: a needed (epoch, shard) item is not done (names epoch and shard).
        """
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"cache {self.path}: epoch {epoch} out of range [0, {self.epochs})")
        self._check_held(epoch)
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        views = np.asarray(views, dtype=np.int64)
        if sample_ids.size:
            if sample_ids.min() < 0 or sample_ids.max() >= self.num_samples:
                raise IndexError(f"cache {self.path}: sample_id out of range [0, {self.num_samples})")
            if views.min() < 0 or views.max() >= self.views:
                raise IndexError(f"cache {self.path}: view out of range [0, {self.views})")
        buf = self._epoch_buffer(epoch)
        loaded = buf["loaded"]
        shard, slots = self.row_slots(sample_ids)
        if not loaded[shard].all():
            for s in np.unique(shard[~loaded[shard]]):
                self._load(epoch, int(s), buf)
        rows = slots * self.views + views
        code = buf["tail_code"][rows] if "tail_code" in buf else None
        return CachedRows(self._lut[buf["codes"][rows]], buf["index"][rows].astype(np.int64), buf["valid"][rows],
                          self._lut[buf["tail_mass"][rows]], code)

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
    (k, epochs, views, num_classes, num_samples, slot).

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
    the group only after checking its inputs and building its teacher, and a learned tail's basis
    before its first item. A group without its ``done`` array is still being created and counts
    as absent; one whose tail basis is not written yet is not ready either.

    Raises:
        TimeoutError: no complete cache after ``timeout`` seconds.
    """
    path = os.fspath(path)
    start = time.monotonic()
    last_log = None
    while True:
        try:
            if "done" in _open_group(path, mode="r"):
                reader = open_cache(path)
                if reader.has_tail():
                    return reader
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
