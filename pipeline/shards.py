"""WebDataset shards with stable sample ids, and their manifest.

Layout of a split written by ``make_shards`` (a local folder or any URL, ``pipeline.urls``)::

    <out>/<split>/<split>-000000.tar     # ``shard_size`` samples each (the last may hold fewer)
    <out>/<split>/manifest.json          # shard names, counts, first ids, bytes, sha256,
                                         # per-shard class counts, classes, sample order

A manifest may also describe shards that live elsewhere and were written by another tool
(``python -m pipeline.make_shards index``, ``pipeline.index``): then each shard entry holds its
absolute ``url`` (or ``pipe:`` command), shards may hold any number of samples, and samples the
index found unusable are listed per shard under ``bad`` (position, key, error).

Each sample in a tar has the members ``<key>.jpg|jpeg|png|webp`` (encoded image) and a label:
``<key>.cls`` (decimal text), else the ``label`` field of ``<key>.json`` (or the manifest's
``label_key`` field, which then is the only label read), else ``<key>.txt`` (decimal text or a
class name of the manifest's class list). ``make_shards`` also writes ``<key>.sid`` (the sample
id as decimal text, checked when present). Member extensions are compared in lower case and a
key ends at the first dot of the member's base name (the WebDataset rules).

``sample_id`` is the position in manifest order: shard order, then position in the shard, so
shard ``i`` holds ids ``[first_id, first_id + count)``. A sample listed as bad keeps its id; every
reader hands it out as a :class:`RawSample` with ``error`` set, so the caching job and the
student treat it like a corrupt image (a missing row, recorded), never dropped silently.

Samples are written in a seeded global shuffle by default (``shuffle_seed``, recorded in the
manifest): an ImageFolder lists files class by class, and a class-sorted shard would give
same-class Mixup partners and single-class batches. :func:`class_mix` measures how mixed a
split's shards are from the manifest's class counts (shards written by other tools may be sorted).

Writing keeps original JPEG/PNG/WebP bytes (the ImageNet convention) after checking that they
decode; other formats are re-encoded as PNG (lossless). Tar members carry fixed metadata,
so writing the same source twice gives byte-identical shards and manifest checksums.
**Atomic writing:** a local split is written into a temporary folder and renamed into place when
complete. An object store has no folder rename, so there the manifest is the completion marker:
it is written last (one PUT), a split without a manifest is incomplete, and a re-run rewrites it.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np

from PIL import Image, ImageOps

from pipeline import urls
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode, to_rgb
from pipeline.urls import file_sha256  # noqa: F401  (re-exported: teacher checkpoints are hashed with it)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no order / class counts; 2: shards beside the manifest, fixed size
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tar member extensions read as the image
JSON_LABEL_KEY = "label"  # the .json field holding the class index by default (timm's imagenet-1k-wds)
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


class ShardError(RuntimeError):
    """A shard is missing, truncated, malformed or does not match its manifest."""


class SampleError(ShardError):
    """One sample cannot be used (e.g. corrupt image bytes, no label); names shard and key.

    Built as ``SampleError(message, shard=..., key=...)``; ``shard``/``key``/``path`` are kept
    as attributes so callers can record the skip without parsing the message.
    """

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None,
                 path: str | None = None):
        super().__init__(message)
        self.shard = shard
        self.key = key
        self.path = path


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
class RawSample:
    """One undecoded sample read from a shard (``shard`` is the tar name, for error messages).

    ``error`` is set for a sample the manifest lists as bad (``label`` is then -1): decoding it
    raises SampleError with that reason, like a corrupt image.
    """

    sample_id: int
    key: str
    label: int
    data: bytes
    ext: str
    shard: str = ""
    error: str | None = None


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


def verify_manifest(m: Manifest) -> None:
    """Check every shard's byte size and sha256 (one read each); raise ShardError naming the first bad shard."""
    for s in m.shards:
        p = m.url(s)
        try:
            with urls.open_read(p) as f:
                reader = urls.HashingReader(f)
                reader.drain()
        except FileNotFoundError:
            raise ShardError(f"shard {s.name}: missing file {p}") from None
        if reader.bytes != s.bytes:
            raise ShardError(f"shard {s.name}: size expected {s.bytes} bytes, found {reader.bytes} ({p})")
        if reader.hexdigest() != s.sha256:
            raise ShardError(f"shard {s.name}: sha256 expected {s.sha256}, found {reader.hexdigest()} ({p})")


# --------------------------------------------------------------------------- reading


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext`` -> (``dir/key``, ``ext`` in lower case); the WebDataset rules (the key
    ends at the first dot of the base name)."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def tar_samples(stream: BinaryIO, shard: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of every sample of a tar stream, in order (consecutive members
    sharing a key form one sample). Raises ShardError naming ``shard`` (and the last key read)
    for a truncated or unreadable tar."""
    groups: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise ShardError(f"shard {shard} key {key}: truncated member {member.name}")
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext] = data
    except (tarfile.TarError, OSError, EOFError) as exn:
        last = groups[-1][0] if groups else None
        raise ShardError(f"shard {shard}: unreadable or truncated tar ({exn}); last key read: {last}") from exn
    return groups


def read_tar(url: str, shard: str, sha256: bool = True) -> tuple[list[tuple[str, dict[str, bytes]]], int, str]:
    """(samples as :func:`tar_samples` gives them, bytes, sha256 or "") of the tar at ``url``, read once
    (hashing on the way costs ~25 % of a local read, so a reader that does not verify skips it).

    Raises ShardError naming ``shard`` for a missing, truncated or unreadable tar (a ``pipe:``
    command's non-zero exit status included).
    """
    try:
        stream = urls.open_read(url)
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: missing file {url}") from None
    reader = urls.HashingReader(stream, sha256)
    try:
        groups = tar_samples(reader, shard)
        reader.drain()
    except (ShardError, OSError) as exn:
        try:
            stream.close()  # a pipe: command that failed explains the broken stream better
        except OSError as closing:
            raise ShardError(f"shard {shard}: {closing} ({url})") from exn
        if isinstance(exn, ShardError):
            raise
        raise ShardError(f"shard {shard}: unreadable ({exn}) ({url})") from exn
    try:
        stream.close()  # a pipe: command's exit status is checked here
    except OSError as exn:
        raise ShardError(f"shard {shard}: {exn} ({url})") from exn
    return groups, reader.bytes, reader.hexdigest()


def _int_label(text: str | int, where: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise SampleError(f"{where}: label {text!r} is not an integer") from None


def sample_label(fields: dict[str, bytes], where: str, label_key: str | None = None,
                 class_index: dict[str, int] | None = None) -> int:
    """The label of one sample's members (see the module docstring for the rule).

    Raises:
        SampleError: no label member, an unreadable one, or a class name not in ``class_index``.
        ValueError: a class name while no class list is known (a usage error, not a bad sample).
    """
    if label_key is None and "cls" in fields:
        return _int_label(fields["cls"].decode(errors="replace").strip(), where)
    if "json" in fields:
        key = label_key or JSON_LABEL_KEY
        try:
            meta = json.loads(fields["json"])
        except ValueError as exn:
            raise SampleError(f"{where}: unreadable .json ({exn})") from None
        if not isinstance(meta, dict) or key not in meta:
            found = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise SampleError(f"{where}: no field {key!r} in .json (found {found})")
        value = meta[key]
    elif label_key is None and "txt" in fields:
        value = fields["txt"].decode(errors="replace").strip()
    else:
        wanted = f"a .json with field {label_key!r}" if label_key else "a .cls, .json or .txt label"
        raise SampleError(f"{where}: no label: expected {wanted}, found members {sorted(fields)}")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SampleError(f"{where}: label {value!r} is neither a class index nor a class name")
    if isinstance(value, int) or value.lstrip("-").isdigit():
        return int(value)
    if class_index is None:
        raise ValueError(f"{where}: label {value!r} is a class name: give the class list (--classes FILE)")
    if value not in class_index:
        raise SampleError(f"{where}: label {value!r} is not in the class list")
    return class_index[value]


def parse_sample(fields: dict[str, bytes], key: str, shard: ShardInfo, position: int, *, check_sid: bool = True,
                 label_key: str | None = None, class_index: dict[str, int] | None = None,
                 num_classes: int | None = None) -> RawSample:
    """A RawSample from one tar sample's members (no decoding).

    Raises:
        ShardError: with ``check_sid``, a ``sid`` member that is not ``shard.first_id + position``
            (shards out of order).
        SampleError: not exactly one image member, no usable label, a label outside
            [0, ``num_classes``) (when given).
    """
    where = f"shard {shard.name} key {key}"
    sid = shard.first_id + position
    if check_sid and "sid" in fields:
        try:
            found = int(fields["sid"])
        except ValueError:
            raise ShardError(f"{where}: bad sid text {fields['sid'][:20]!r}") from None
        if found != sid:
            raise ShardError(f"{where}: sid {found} at position {position}, expected {sid}")
    exts = [e for e in IMAGE_EXTS if e in fields]
    if len(exts) != 1:
        raise SampleError(f"{where}: expected exactly one image member of {IMAGE_EXTS}, found {sorted(fields)}",
                          shard=shard.name, key=key)
    try:
        label = sample_label(fields, where, label_key, class_index)
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise SampleError(f"{where}: label {label} outside [0, {num_classes if num_classes else '...'})")
    except SampleError as exn:
        raise SampleError(str(exn), shard=shard.name, key=key) from None
    return RawSample(sample_id=sid, key=key, label=label, data=fields[exts[0]], ext=exts[0], shard=shard.name)


def read_shard(manifest: Manifest, shard: ShardInfo, verify: bool = False) -> list[RawSample]:
    """Read one whole shard into RawSamples, in shard order: the one reader of the caching job,
    the loader, calibration and the audit, for every place a shard can live (``pipeline.urls``).

    Samples the manifest lists as bad come back with ``error`` set. Raises ShardError naming the
    shard (and key where known) for a missing shard, a truncated or unreadable tar, a sample that
    no longer parses as it did when the manifest was written, a sid that is not
    ``first_id + position``, or a sample count different from the manifest. ``verify=True`` also
    checks the size and sha256 of the bytes read (hashed on the way, no second read).
    """
    url = manifest.url(shard)
    groups, size, digest = read_tar(url, shard.name, sha256=verify)
    if verify and (size != shard.bytes or digest != shard.sha256):
        raise ShardError(f"shard {shard.name}: sha256 expected {shard.sha256} ({shard.bytes} bytes), found "
                         f"{digest} ({size} bytes) ({url})")
    if len(groups) != shard.count:
        raise ShardError(f"shard {shard.name}: {len(groups)} samples, manifest says {shard.count} "
                         f"(truncated tar?) ({url})")
    bad = {pos: (key, err) for pos, key, err in shard.bad}
    samples = []
    for position, (key, fields) in enumerate(groups):
        if position in bad:
            if bad[position][0] != key:
                raise ShardError(f"shard {shard.name}: position {position} holds key {key}, the manifest lists "
                                 f"bad sample {bad[position][0]} there (the shard changed since it was indexed)")
            exts = [e for e in IMAGE_EXTS if e in fields]
            samples.append(RawSample(sample_id=shard.first_id + position, key=key, label=-1,
                                     data=fields[exts[0]] if exts else b"", ext=exts[0] if exts else "",
                                     shard=shard.name, error=bad[position][1]))
            continue
        try:
            # make_shards' own shards (beside their manifest) carry sids; an indexed shard's ids are positions
            samples.append(parse_sample(fields, key, shard, position, check_sid=shard.url is None,
                                        label_key=manifest.label_key,
                                        class_index=manifest.class_index, num_classes=manifest.num_classes))
        except SampleError as exn:  # it parsed when the manifest was written
            raise ShardError(f"{exn} (the shard changed since its manifest was written?) ({url})") from None
    return samples


def decode_image(raw: RawSample, exif_transpose: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a sample's bytes into 8-bit RGB (``pipeline.decode.decode``); SampleError naming
    shard/key, also for a sample the manifest lists as bad or one over ``max_pixels``."""
    if raw.error is not None:
        raise SampleError(f"shard {raw.shard or '?'} key {raw.key} (sample_id {raw.sample_id}): listed as bad "
                          f"in the manifest: {raw.error}", shard=raw.shard, key=raw.key)
    try:
        return decode(raw.data, exif_transpose, max_pixels)
    except DecodeError as exn:
        raise SampleError(f"shard {raw.shard or '?'} key {raw.key} (sample_id {raw.sample_id}): "
                          f"cannot decode {raw.ext}: {exn}", shard=raw.shard, key=raw.key) from exn


# --------------------------------------------------------------------------- writing

def sanitize_key(key: str) -> str:
    """Make a WebDataset-safe key: no dots (the key ends at the first dot), no spaces/slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", key)


def encode_for_shard(data: bytes, origin: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, str]:
    """Validate encoded image bytes by decoding them the plan's way; return (bytes, ext).

    JPEG, PNG and WebP bytes are kept as they are (the ImageNet convention); any other format
    Pillow reads (TIFF, BMP, PPM, GIF, ...) is re-encoded as lossless PNG in its own mode where
    PNG has one (16-bit gray, alpha, palette stay), with the EXIF orientation applied, because
    the PNG loses the tag. Raises SampleError naming ``origin`` if the image cannot be decoded
    or has more than ``max_pixels`` pixels (checked from its header, before decoding).
    """
    try:
        decode(data, max_pixels=max_pixels)  # the same rule the replay applies: what passes here decodes there
        with Image.open(io.BytesIO(data)) as im:
            ext = _KEPT_FORMATS.get(im.format)
            if ext is not None:
                return data, ext
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode not in _PNG_MODES:
                im = to_rgb(im)
            out = io.BytesIO()
            im.save(out, format="PNG")
            return out.getvalue(), "png"
    except Exception as exn:
        raise SampleError(f"{origin}: cannot decode image: {exn}", path=origin) from exn


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of a PIL image (used for array sources such as Fashion-MNIST)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


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


# --------------------------------------------------------------------------- class mix


@dataclass(frozen=True)
class ClassMix:
    """How class-mixed a split's shards are, against the same shards in random order.

    ``distinct``/``distinct_random``: mean distinct classes per shard, observed and expected
    for a uniformly random order; ``same_pair``/``same_pair_random``: chance that two samples
    of one shard (a Mixup/CutMix pair) share a class; ``worst``: names of the least mixed shards.
    """

    distinct: float
    distinct_random: float
    same_pair: float
    same_pair_random: float
    worst: tuple[str, ...]

    @property
    def ratio(self) -> float:
        return self.distinct / self.distinct_random if self.distinct_random else 1.0


def expected_distinct(class_totals: Sequence[int], draws: int) -> float:
    """Mean number of distinct classes in ``draws`` samples taken uniformly without replacement
    from a population with ``class_totals`` samples per class: sum_c 1 - C(n - n_c, d) / C(n, d)."""
    n = sum(class_totals)
    base = math.lgamma(n + 1) - math.lgamma(n - draws + 1)
    return sum(1.0 if n - nc < draws else
               1.0 - math.exp(math.lgamma(n - nc + 1) - math.lgamma(n - nc - draws + 1) - base)
               for nc in class_totals)


def class_mix(m: Manifest) -> ClassMix | None:
    """:class:`ClassMix` from the manifest's per-shard class counts (None if it has none)."""
    if any(s.class_counts is None for s in m.shards):
        return None
    totals: Counter = Counter()
    for s in m.shards:
        for label, c in s.class_counts:
            totals[label] += c
    if sum(totals.values()) < 2:
        return None
    n = sum(totals.values())   # labelled samples (samples listed as bad have no class)
    labelled = [sum(c for _, c in s.class_counts) for s in m.shards]
    sizes = {c: expected_distinct(list(totals.values()), c) for c in set(labelled)}
    distinct = [len(s.class_counts) for s in m.shards]
    expected = [sizes[c] for c in labelled]
    pairs = [(sum(c * (c - 1) for _, c in s.class_counts), c * (c - 1)) for s, c in zip(m.shards, labelled)]
    random_pair = sum(c * (c - 1) for c in totals.values()) / (n * (n - 1))
    worst = sorted(range(len(m.shards)), key=lambda i: distinct[i] / expected[i] if expected[i] else 1.0)[:3]
    return ClassMix(distinct=sum(distinct) / len(distinct), distinct_random=sum(expected) / len(expected),
                    same_pair=sum(p for p, _ in pairs) / max(1, sum(q for _, q in pairs)),
                    same_pair_random=random_pair, worst=tuple(m.shards[i].name for i in worst))


def class_mix_warning(m: Manifest, threshold: float = 0.5) -> str | None:
    """A warning when shards hold far fewer classes than a random order would (e.g. class-sorted)."""
    mix = class_mix(m)
    if mix is None or mix.ratio >= threshold:
        return None
    return (f"warning: shards of {m.path} look class-sorted: {mix.distinct:.1f} distinct classes per shard "
            f"on average, a random order would give {mix.distinct_random:.1f} (least mixed: {', '.join(mix.worst)}); "
            f"Mixup/CutMix partners come from the same shard, so {100 * mix.same_pair:.0f}% of pairs share a class "
            f"(random order: {100 * mix.same_pair_random:.1f}%). Re-shard with `python -m pipeline.make_shards` "
            f"(it shuffles by default).")


def iter_samples(m: Manifest, verify: bool = False) -> Iterator[RawSample]:
    """All RawSamples of a split in sample-id order (reads shard by shard)."""
    for s in m.shards:
        yield from read_shard(m, s, verify=verify)
