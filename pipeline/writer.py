"""Writing a split: WebDataset shards of a fixed size, then their manifest.

Samples are written in a seeded global shuffle by default (``shuffle_seed``, recorded in the
manifest): an ImageFolder lists files class by class, and a class-sorted shard would give
same-class Mixup partners and single-class batches (``pipeline.classmix`` measures it).

Writing keeps original JPEG/PNG/WebP bytes after checking that they decode, and re-encodes other
formats as PNG (``pipeline.decode.encode_for_shard``). Tar members carry fixed metadata, so
writing the same source twice gives byte-identical shards and manifest checksums.

**Atomic writing:** a local split is written into a temporary folder and renamed into place when
complete. An object store has no folder rename, so there the manifest is the completion marker:
it is written last (one PUT), a split without a manifest is incomplete, and a re-run rewrites it.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pipeline import urls
from pipeline.decode import DEFAULT_MAX_PIXELS, encode_for_shard
from pipeline.errors import SampleError, ShardError
from pipeline.manifest import (MANIFEST_NAME, Manifest, ShardInfo, load_manifest, manifest_dict, shard_name,
                               write_manifest)


@dataclass
class SourceSample:
    """One input to :func:`write_shards`.

    ``data`` may be None, then the bytes are read from ``path`` while writing (so read
    errors are reported, or skipped with ``skip_bad``, like decode errors). ``path`` names
    the origin in error messages and skip records.
    """

    key: str
    label: int
    path: str
    data: bytes | None = None


def sanitize_key(key: str) -> str:
    """Make a WebDataset-safe key: no dots (the key ends at the first dot), no spaces/slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", key)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same input gives byte-identical shards (stable checksums).
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Writes consecutive shards of exactly ``shard_size`` samples into the folder ``split_dir``
    (a local path or URL), hashing each on the way out."""

    def __init__(self, split_dir: str, split: str, shard_size: int):
        self.split_dir, self.split, self.shard_size = split_dir, split, shard_size
        self.shards: list[ShardInfo] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.keys: set[str] = set()
        self.labels: Counter = Counter()

    def add(self, key: str, label: int, data: bytes, ext: str, sample_id: int) -> None:
        if self.tar is None:
            self.name = shard_name(self.split, len(self.shards))
            self.stream = urls.open_write(urls.join(self.split_dir, self.name))
            self.out = urls.HashingWriter(self.stream)
            self.tar = tarfile.open(fileobj=self.out, mode="w", format=tarfile.USTAR_FORMAT)
            self.count, self.keys, self.labels = 0, set(), Counter()
        if key in self.keys:
            raise ShardError(f"duplicate key {key!r} in shard {self.name}")
        self.keys.add(key)
        self.labels[label] += 1
        _add_member(self.tar, f"{key}.{ext}", data)
        _add_member(self.tar, f"{key}.cls", str(label).encode())
        _add_member(self.tar, f"{key}.sid", str(sample_id).encode())
        self.count += 1
        if self.count == self.shard_size:
            self.close()

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.stream.close()
        self.tar = None
        index = len(self.shards)
        self.shards.append(ShardInfo(name=self.name, index=index, first_id=index * self.shard_size,
                                     count=self.count, bytes=self.out.bytes, sha256=self.out.hexdigest(),
                                     class_counts=tuple(sorted(self.labels.items()))))

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.stream.close()
            self.tar = None


def shuffled(items: Sequence, seed: int) -> list:
    """``items`` in a seeded order (Philox keyed on ``seed``; no global RNG)."""
    key = np.random.SeedSequence((0x6B645F6D, int(seed))).generate_state(2, np.uint64)  # "kd_m"
    perm = np.random.Generator(np.random.Philox(key=key)).permutation(len(items))
    return [items[i] for i in perm.tolist()]


def _clear_stale_partials(out_dir: Path, split: str) -> None:
    """Remove ``.<split>.partial-<pid>`` folders left by killed runs (their pid is gone)."""
    for p in out_dir.glob(f".{split}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another run is writing it right now
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_shards(
    samples: Iterable[SourceSample],
    out_dir: str | os.PathLike,
    split: str,
    classes: Sequence[str],
    shard_size: int,
    *,
    shuffle_seed: int | None = 0,
    skip_bad: bool = False,
    source: Any = None,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Manifest:
    """Write ``samples`` as ``<out_dir>/<split>/<split>-%06d.tar`` shards plus ``manifest.json``.

    ``out_dir`` is a local folder or any URL (``pipeline.urls``). Locally the split is written into
    ``<out_dir>/.<split>.partial-<pid>/`` and moved into place only when complete, so a failed or
    killed run never leaves a half-written split (a later run removes the stale partial folder).
    An object store has no rename: the shards go straight to ``<out_dir>/<split>/`` and the
    manifest, written last, marks the split complete; a split without one is incomplete and
    is rewritten (its leftover shards are replaced or removed).

    Args:
        samples: SourceSamples (label in [0, len(classes))).
        out_dir: dataset root; the split folder is created under it.
        split: split name ("train", "val", ...), used for folder and shard names.
        classes: class names; index = label.
        shard_size: samples per shard (every shard but the last holds exactly this many).
        shuffle_seed: write the samples in this seeded global order (sample_id = position in it),
            so every shard holds a class-random mix, as Mixup partners and batches need;
            None keeps the source order (an ImageFolder's is class-sorted).
        skip_bad: record undecodable/unreadable images in ``manifest["skipped"]`` (path + error)
            instead of raising SampleError naming the file.
        source: free-form description of the source, stored in the manifest.
        overwrite: replace an existing split.
        progress: optional wrapper for the sample iterator (e.g. ``tqdm``).
        max_pixels: an image with more pixels is a bad sample (``pipeline.decode``, refused
            from its header).

    Returns:
        The loaded Manifest.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = os.fspath(out_dir)
    split_dir = urls.join(out_dir, split)
    local = urls.is_local(out_dir)
    if local:
        root = Path(urls.local_path(out_dir))
        if (root / split).exists() and any((root / split).iterdir()) and not overwrite:
            what = "a complete split" if (root / split / MANIFEST_NAME).exists() else "files but no manifest"
            raise FileExistsError(f"{root / split} already holds {what} (use overwrite / --overwrite)")
        root.mkdir(parents=True, exist_ok=True)
        _clear_stale_partials(root, split)
        partial = root / f".{split}.partial-{os.getpid()}"
        partial.mkdir()
        target = str(partial)
    else:
        if urls.exists(urls.join(split_dir, MANIFEST_NAME)):
            if not overwrite:
                raise FileExistsError(f"{split_dir} already holds a complete split (use overwrite / --overwrite)")
            urls.remove(urls.join(split_dir, MANIFEST_NAME))  # from here on the split is incomplete
        target = split_dir
    if shuffle_seed is not None:
        samples = shuffled(list(samples), shuffle_seed)
    writer = _ShardWriter(target, split, shard_size)
    skipped: list[dict] = []
    n = 0
    it = progress(samples) if progress is not None else samples
    try:
        for s in it:
            if not 0 <= s.label < len(classes):
                raise ValueError(f"{s.path}: label {s.label} outside [0, {len(classes)})")
            try:
                data = s.data
                if data is None:
                    try:
                        data = Path(s.path).read_bytes()
                    except OSError as exn:
                        raise SampleError(f"{s.path}: cannot read: {exn}", path=s.path) from exn
                data, ext = encode_for_shard(data, s.path, max_pixels)
            except SampleError as exn:
                if not skip_bad:
                    raise
                skipped.append({"path": s.path, "key": s.key, "error": str(exn)})
                continue
            writer.add(sanitize_key(s.key), s.label, data, ext, n)
            n += 1
        writer.close()
        if n == 0:
            raise ShardError(f"{split_dir}: no samples to write for split {split!r}")
        manifest = manifest_dict(split, classes, shard_size, writer.shards, skipped, source,
                                 {"shuffle_seed": shuffle_seed})
        if local:
            write_manifest(target, manifest)
            _move_into_place(partial, root / split)
        else:
            written = {s.name for s in writer.shards}
            for name in urls.list_names(split_dir):  # shards of an earlier, incomplete run
                if name not in written and name.startswith(f"{split}-") and name.endswith(".tar"):
                    urls.remove(urls.join(split_dir, name))
            write_manifest(split_dir, manifest)   # last: the split is complete
    except BaseException:
        writer.abort()
        if local:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return load_manifest(split_dir)


def _move_into_place(partial: Path, split_dir: Path) -> None:
    """Replace ``split_dir`` by the finished ``partial`` folder (the old one, if any, goes last)."""
    old = None
    if split_dir.exists():
        old = split_dir.with_name(f".{split_dir.name}.old-{os.getpid()}")
        os.replace(split_dir, old)
    os.replace(partial, split_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
