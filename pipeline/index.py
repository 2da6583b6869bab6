"""Bring your own WebDataset shards: a manifest for shards that exist, without rewriting them.

    python -m pipeline.make_shards index 's3://bucket/imagenet/train-{000000..001281}.tar' \\
        --out /data/imagenet-manifests/train [--classes synsets.txt] [--skip-bad]

Every shard is read once (``--workers`` in parallel, from any place ``pipeline.urls`` reads:
path, fsspec URL or ``pipe:`` command) and the manifest records per shard its absolute URL,
sample count, bytes, sha256, class counts and the samples it cannot use, plus the class list.
The manifest folder and the shards may live in different places. Sample ids are manifest
positions: shard order as given (after brace expansion), then position in the shard; shards
written by other tools carry no ``.sid``, and one that does is not checked against these ids.

**Accepted layouts** (the common ImageNet WebDataset ones): the image is the one member with
extension ``.jpg``, ``.jpeg``, ``.png`` or ``.webp`` (any case, e.g. ``.JPEG``); the label is
``.cls`` (class index as decimal text), else the ``label`` field of ``.json`` (an index, or a
class name), else ``.txt`` (an index, or a class name such as a WordNet synset). That reads
timm's ``imagenet-1k-wds`` and the webdataset project's ImageNet conversion (both ``.jpg`` +
``.cls`` + a ``.json`` of metadata; the ``.cls`` index is read, as timm does by default) and
shards written by ``make_shards``.
``--label-key KEY`` reads the label from that ``.json`` field only (timm's ``target_key``, e.g.
another label set stored beside the default). Class names need ``--classes FILE`` (one name per
line, first token: ``LOC_synset_mapping.txt`` works); without it labels must be indices and the
classes are ``0 .. max label``. Other members (captions, metadata) are ignored.

**Bad samples.** A sample that cannot be used (no image or two, bytes the plan's decoder
refuses, no label, a label outside the class list) stops the run with an error naming shard
and key, unless ``--skip-bad``: then it is listed under its shard's ``bad`` entries and keeps
its sample id, and every reader hands it out as a bad sample: the caching job stores its rows
as missing (recorded with shard and key) and the student counts them as dropped, exactly as for
a corrupt image; nothing is dropped silently and no id moves.

Shards may hold different numbers of samples; the cache gives each a slot of the largest count
(``storage``), so very uneven shards cost padding, which the summary reports. Class-sorted
shards (low class diversity per shard) get the same warning as in ``make_shards``.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from pipeline import urls
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode
from pipeline.errors import SampleError, ShardError
from pipeline.manifest import Manifest, ShardInfo, load_manifest, manifest_dict, write_manifest
from pipeline.shards import parse_sample, read_tar


@dataclass
class IndexedShard:
    """What reading one shard found: counts, checksum, labels, unusable samples."""

    url: str
    count: int
    bytes: int
    sha256: str
    labels: dict[int, int]
    bad: list[tuple[int, str, str]]   # (position, key, error)


def index_shard(url: str, name: str, label_key: str | None = None, classes: Sequence[str] | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> IndexedShard:
    """Read one shard: count, bytes, sha256, label counts, and every sample that cannot be used.

    Each image is decoded with the plan's rule (``pipeline.decode``), so what passes here
    decodes in the caching job and the student; one over ``max_pixels`` is unusable (refused from
    its header, not decoded).

    Raises:
        ShardError: a missing, truncated or unreadable shard (names it).
        ValueError: a label given as a class name while ``classes`` is None.
    """
    class_index = None if classes is None else {c: i for i, c in enumerate(classes)}
    info = ShardInfo(name=name, index=0, first_id=0, count=0, bytes=0, sha256="")
    groups, size, digest = read_tar(url, name)
    labels: Counter = Counter()
    bad: list[tuple[int, str, str]] = []
    for position, (key, fields) in enumerate(groups):
        try:
            raw = parse_sample(fields, key, info, position, check_sid=False, label_key=label_key,
                               class_index=class_index, num_classes=None if classes is None else len(classes))
            try:
                decode(raw.data, max_pixels=max_pixels)
            except DecodeError as exn:
                raise SampleError(f"shard {name} key {key}: cannot decode {raw.ext}: {exn}") from None
        except SampleError as exn:
            bad.append((position, key, str(exn)))
            continue
        labels[raw.label] += 1
    return IndexedShard(url, len(groups), size, digest, dict(labels), bad)


def shard_names(shard_urls: Sequence[str]) -> list[str]:
    """Names for messages and records: base names, or paths below the common folder when those collide."""
    names = [urls.basename(u) for u in shard_urls]
    if len(set(names)) == len(names):
        return names
    common = posixpath.commonpath([u.split("://", 1)[-1] for u in shard_urls])
    names = [posixpath.relpath(u.split("://", 1)[-1], common) for u in shard_urls]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the same shard is listed twice: {dup[:3]}")
    return names


def _map(fn: Callable, args: list[tuple], workers: int, progress: Callable[[Iterable], Iterable] | None) -> list:
    """``fn(*a)`` for each of ``args``, in order, in ``workers`` spawned processes (fsspec clients
    are not fork-safe) or in this one."""
    wrap = progress or (lambda it: it)
    if workers <= 1 or len(args) <= 1:
        return [fn(*a) for a in wrap(args)]
    with cf.ProcessPoolExecutor(min(workers, len(args)), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        for _ in wrap(cf.as_completed(futures)):
            pass
        return [f.result() for f in futures]


def index_shards(patterns: str | Sequence[str], out: str, *, classes: Sequence[str] | None = None,
                 label_key: str | None = None, skip_bad: bool = False, split: str | None = None,
                 workers: int = 1, progress: Callable[[Iterable], Iterable] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Manifest:
    """Write ``<out>/manifest.json`` for the existing shards ``patterns`` (brace patterns allowed).

    Args:
        patterns: shard URLs in sample order: paths, fsspec URLs or ``pipe:`` commands,
            ``{000000..001281}`` expanded.
        out: the manifest folder (a path or URL; need not be where the shards are).
        classes: class names in label order; None: labels must be indices, classes ``0..max``.
        label_key: read the label from this ``.json`` field only (default: ``.cls``, ``.json``
            ``label``, ``.txt``; see the module docstring).
        skip_bad: list unusable samples in the manifest (they keep their ids) instead of raising.
        split: the split's name (default: the last component of ``out``).
        workers: shards read in parallel (processes).
        progress: optional wrapper of the per-shard iteration (e.g. ``tqdm``).
        max_pixels: a sample with a larger image is unusable (``pipeline.decode``).

    Returns:
        The loaded Manifest.

    Raises:
        SampleError: an unusable sample without ``skip_bad`` (names shard, key and how many in all).
        ShardError: a missing, unreadable or empty shard (names it).
    """
    given = [patterns] if isinstance(patterns, str) else list(patterns)
    shard_urls = [urls.absolute(u) for u in urls.expand(given)]
    if not shard_urls:
        raise ValueError("index: no shard URLs given")
    names = shard_names(shard_urls)
    found: list[IndexedShard] = _map(index_shard, [(u, n, label_key, classes, max_pixels)
                                                   for u, n in zip(shard_urls, names)], workers, progress)
    bad = [(n, b) for n, f in zip(names, found) for b in f.bad]
    if bad and not skip_bad:
        name, (position, key, error) = bad[0]
        raise SampleError(f"{error} (position {position}; {len(bad)} unusable sample(s) in all, --skip-bad lists "
                          f"them in the manifest)", shard=name, key=key)
    empty = [n for n, f in zip(names, found) if f.count == 0]
    if empty:
        raise ShardError(f"shard {empty[0]}: holds no samples ({len(empty)} empty shard(s))")
    if classes is None:
        top = max((label for f in found for label in f.labels), default=-1)
        classes = [str(i) for i in range(top + 1)]
    shards, first = [], 0
    for i, (n, f) in enumerate(zip(names, found)):
        shards.append(ShardInfo(name=n, index=i, first_id=first, count=f.count, bytes=f.bytes, sha256=f.sha256,
                                class_counts=tuple(sorted(f.labels.items())), url=f.url, bad=tuple(f.bad)))
        first += f.count
    source = {"type": "index", "shards": given, "label_key": label_key, "skip_bad": skip_bad}
    split = split or urls.basename(out) or "train"
    write_manifest(out, manifest_dict(split, classes, max(s.count for s in shards), shards, [], source,
                                      {"shuffle_seed": None}, label_key))
    return load_manifest(out)


def padding(m: Manifest) -> float:
    """Fraction of the cache's storage rows that are padding (storage.create_cache gives every shard a
    slot of the largest shard's count, which may be below ``m.shard_size``, make_shards' configured size)."""
    return 1.0 - m.num_samples / (len(m.shards) * max(s.count for s in m.shards))


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
