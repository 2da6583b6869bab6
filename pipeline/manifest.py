"""The manifest of a split: which shards it has, where they are, and which sample ids they hold.

Layout of a split written by ``make_shards`` (a local folder or any URL, ``pipeline.urls``)::

    <out>/<split>/<split>-000000.tar     # ``shard_size`` samples each (the last may hold fewer)
    <out>/<split>/manifest.json          # shard names, counts, first ids, bytes, sha256,
                                         # per-shard class counts, classes, sample order

A manifest may also describe shards that live elsewhere and were written by another tool
(``python -m pipeline.make_shards index``, ``pipeline.index``): then each shard entry holds its
absolute ``url`` (or ``pipe:`` command), shards may hold any number of samples, and samples the
index found unusable are listed per shard under ``bad`` (position, key, error).

``sample_id`` is the position in manifest order: shard order, then position in the shard, so
shard ``i`` holds ids ``[first_id, first_id + count)``. A sample listed as bad keeps its id; every
reader (``pipeline.shards``) hands it out with its error set, so the caching job and the
student treat it like a corrupt image (a missing row, recorded), never dropped silently.

The manifest is written in one piece and last (``pipeline.writer``): on an object store, where
a folder cannot be renamed into place, it is the mark of a complete split.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from pipeline import urls
from pipeline.errors import ShardError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no order / class counts; 2: shards beside the manifest, fixed size


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in the manifest.

    ``url``: where the shard lives when it is not ``<manifest folder>/<name>`` (indexed shards);
    ``bad``: (position, key, error) of samples recorded as unusable when the shard was indexed.
    """

    name: str
    index: int
    first_id: int
    count: int
    bytes: int
    sha256: str
    class_counts: tuple[tuple[int, int], ...] | None = None   # (label, count), labels ascending
    url: str | None = None
    bad: tuple[tuple[int, str, str], ...] = ()


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of one split folder."""

    split: str
    num_samples: int
    num_classes: int
    classes: list[str]
    shard_size: int         # the largest shard's count (make_shards: samples per shard)
    shards: list[ShardInfo]
    skipped: list[dict] = field(default_factory=list)   # sources make_shards did not write
    source: Any = None
    order: dict = field(default_factory=dict)   # {"shuffle_seed": s} or {"shuffle_seed": None} (source order)
    label_key: str | None = None   # the .json field that holds the label (None: the default rule)
    path: str = ""          # the split folder (local path or URL)
    sha256: str = ""        # sha256 of the manifest file bytes

    def url(self, shard: ShardInfo | int) -> str:
        """Where a shard's tar is: its own ``url``, else beside the manifest."""
        info = self.shards[shard] if isinstance(shard, int) else shard
        return info.url or urls.join(self.path, info.name)

    def shard_of(self, sample_id: int) -> ShardInfo:
        """The shard holding ``sample_id`` (ids are contiguous in shard order)."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"{self.path}: sample_id {sample_id} not in [0, {self.num_samples})")
        return self.shards[bisect.bisect_right(self._firsts, sample_id) - 1]

    @cached_property
    def _firsts(self) -> list[int]:
        return [s.first_id for s in self.shards]

    @cached_property
    def class_index(self) -> dict[str, int]:
        """Class name -> label (for labels given as names, e.g. ``.txt`` synsets)."""
        return {name: i for i, name in enumerate(self.classes)}

    def bad_samples(self) -> list[dict]:
        """Samples listed as bad (shard, key, sample_id, error), in sample-id order."""
        return [{"shard": s.name, "key": key, "sample_id": s.first_id + pos, "error": err}
                for s in self.shards for pos, key, err in s.bad]


def shard_name(split: str, index: int) -> str:
    """The tar name of shard ``index`` of a split written by ``make_shards``."""
    return f"{split}-{index:06d}.tar"


def load_manifest(split_dir: str | os.PathLike) -> Manifest:
    """Read ``<split_dir>/manifest.json`` (a local folder or any URL) and check its consistency:
    shard ids contiguous in shard order, counts between 1 and ``shard_size``, summing to ``num_samples``."""
    split_dir = os.fspath(split_dir)
    split_dir = split_dir.rstrip("/") if "://" in split_dir else str(Path(split_dir))
    path = urls.join(split_dir, MANIFEST_NAME)
    try:
        raw = urls.read_bytes(path)
    except FileNotFoundError:
        raise ShardError(f"no manifest at {path} (write shards with python -m pipeline.make_shards, "
                         f"or index existing ones with python -m pipeline.make_shards index)") from None
    d = json.loads(raw)
    if d.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: version: expected one of {READABLE_VERSIONS}, found {d.get('version')}")

    def counts(s: dict):
        cc = s.get("class_counts")
        return None if cc is None else tuple((int(label), int(c)) for label, c in cc)

    shards = [ShardInfo(name=s["name"], index=i, first_id=s["first_id"], count=s["count"],
                        bytes=s["bytes"], sha256=s["sha256"], class_counts=counts(s), url=s.get("url"),
                        bad=tuple((int(b["position"]), b["key"], b["error"]) for b in s.get("bad", ())))
              for i, s in enumerate(d["shards"])]
    m = Manifest(split=d["split"], num_samples=d["num_samples"], num_classes=d["num_classes"],
                 classes=list(d["classes"]), shard_size=d["shard_size"], shards=shards,
                 skipped=list(d.get("skipped", [])), source=d.get("source"), order=d.get("order", {}),
                 label_key=d.get("label_key"), path=split_dir, sha256=hashlib.sha256(raw).hexdigest())
    first = 0
    for s in shards:
        if s.first_id != first or not 1 <= s.count <= m.shard_size:
            raise ShardError(f"{path}: shard {s.name}: first_id/count {s.first_id}/{s.count}, expected first_id "
                             f"{first} (the counts of the shards before it) and a count in [1, {m.shard_size}]")
        first += s.count
    if first != m.num_samples:
        raise ShardError(f"{path}: shard counts sum to {first}, num_samples {m.num_samples}")
    return m


def manifest_dict(split: str, classes: Sequence[str], shard_size: int, shards: Sequence[ShardInfo],
                  skipped: list[dict], source: Any, order: dict, label_key: str | None = None) -> dict:
    """The JSON content of ``manifest.json`` (format MANIFEST_VERSION)."""

    def entry(s: ShardInfo) -> dict:
        d = {"name": s.name, "count": s.count, "first_id": s.first_id, "bytes": s.bytes, "sha256": s.sha256,
             "class_counts": None if s.class_counts is None else [list(c) for c in s.class_counts]}
        if s.url is not None:
            d["url"] = s.url
        if s.bad:
            d["bad"] = [{"position": p, "key": k, "error": e} for p, k, e in s.bad]
        return d

    return {
        "version": MANIFEST_VERSION, "split": split, "num_samples": sum(s.count for s in shards),
        "num_classes": len(classes), "classes": list(classes), "shard_size": shard_size, "order": order,
        "label_key": label_key, "shards": [entry(s) for s in shards], "skipped": skipped, "source": source,
    }


def write_manifest(split_dir: str, manifest: dict) -> None:
    """Write ``manifest.json`` into ``split_dir`` in one piece (temporary file + rename, or one PUT)."""
    urls.write_bytes(urls.join(split_dir, MANIFEST_NAME), (json.dumps(manifest, indent=1) + "\n").encode())
