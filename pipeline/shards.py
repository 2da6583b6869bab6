"""WebDataset shards with stable sample ids, and their manifest.

Layout (one folder per split)::

    <out>/<split>/<split>-000000.tar     # exactly ``shard_size`` samples (the last may hold fewer)
    <out>/<split>/manifest.json          # shard names, counts, first ids, bytes, sha256,
                                         # per-shard class counts, classes, sample order

Each sample in a tar has the members ``<key>.jpg|jpeg|png|webp`` (encoded image),
``<key>.cls`` (label as decimal text) and ``<key>.sid`` (sample id as decimal text).
``sample_id`` is the global position in manifest order, so shard ``i`` starts at
``i * shard_size``; storage chunks rely on that fixed size.

Samples are written in a seeded global shuffle by default (``shuffle_seed``, recorded in the
manifest): an ImageFolder lists files class by class, and a class-sorted shard would give
same-class Mixup partners and single-class batches. :func:`class_mix` measures how mixed a
split's shards are from the manifest's class counts (shards written by other tools may be sorted).

Writing keeps original JPEG/PNG/WebP bytes (the ImageNet convention) after checking that they
decode; other formats are re-encoded as PNG (lossless). Tar members carry fixed metadata,
so writing the same source twice gives byte-identical shards and manifest checksums. A split
is written into a temporary folder and moved into place when complete.
"""
from __future__ import annotations

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
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from PIL import Image, ImageOps

from pipeline.decode import DecodeError, decode, to_rgb

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no order / class counts
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tar member extensions read as the image
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


class ShardError(RuntimeError):
    """A shard is missing, truncated, malformed or does not match its manifest."""


class SampleError(ShardError):
    """One sample cannot be used (e.g. corrupt image bytes); names shard and key.

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
    """One shard as listed in the manifest."""

    name: str
    index: int
    first_id: int
    count: int
    bytes: int
    sha256: str
    class_counts: tuple[tuple[int, int], ...] | None = None   # (label, count), labels ascending


@dataclass
class RawSample:
    """One undecoded sample read from a shard (``shard`` is the tar name, for error messages)."""

    sample_id: int
    key: str
    label: int
    data: bytes
    ext: str
    shard: str = ""


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
    shard_size: int
    shards: list[ShardInfo]
    skipped: list[dict] = field(default_factory=list)
    source: Any = None
    order: dict = field(default_factory=dict)   # {"shuffle_seed": s} or {"shuffle_seed": None} (source order)
    path: str = ""          # the split folder
    sha256: str = ""        # sha256 of the manifest file bytes

    def url(self, shard: ShardInfo | int) -> str:
        """Path of a shard's tar file."""
        info = self.shards[shard] if isinstance(shard, int) else shard
        return os.path.join(self.path, info.name)

    def shard_of(self, sample_id: int) -> ShardInfo:
        """The shard holding ``sample_id`` (ids are contiguous, ``shard_size`` per shard)."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"{self.path}: sample_id {sample_id} not in [0, {self.num_samples})")
        return self.shards[sample_id // self.shard_size]

    def urls(self) -> list[str]:
        """Paths of all shards, in manifest order."""
        return [self.url(s) for s in self.shards]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def load_manifest(split_dir: str | os.PathLike) -> Manifest:
    """Read ``<split_dir>/manifest.json`` and check its internal consistency."""
    path = Path(split_dir) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"no manifest at {path} (write shards with python -m pipeline.make_shards)") from None
    d = json.loads(raw)
    if d.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: version: expected one of {READABLE_VERSIONS}, found {d.get('version')}")

    def counts(s: dict):
        cc = s.get("class_counts")
        return None if cc is None else tuple((int(label), int(c)) for label, c in cc)

    shards = [ShardInfo(name=s["name"], index=i, first_id=s["first_id"], count=s["count"],
                        bytes=s["bytes"], sha256=s["sha256"], class_counts=counts(s))
              for i, s in enumerate(d["shards"])]
    m = Manifest(split=d["split"], num_samples=d["num_samples"], num_classes=d["num_classes"],
                 classes=list(d["classes"]), shard_size=d["shard_size"], shards=shards,
                 skipped=list(d.get("skipped", [])), source=d.get("source"), order=d.get("order", {}),
                 path=str(Path(split_dir)), sha256=hashlib.sha256(raw).hexdigest())
    for s in shards:
        expect_count = min(m.shard_size, m.num_samples - s.first_id)
        if s.first_id != s.index * m.shard_size or s.count != expect_count:
            raise ShardError(f"{path}: shard {s.name}: first_id/count {s.first_id}/{s.count}, expected "
                             f"{s.index * m.shard_size}/{expect_count} for shard_size {m.shard_size}")
    if sum(s.count for s in shards) != m.num_samples:
        raise ShardError(f"{path}: shard counts sum to {sum(s.count for s in shards)}, num_samples {m.num_samples}")
    return m


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a local file or an fsspec URL (shards, teacher checkpoints)."""
    h = hashlib.sha256()
    if "://" in str(path):
        import fsspec

        opened = fsspec.open(str(path), "rb").open()
    else:
        opened = open(path, "rb")
    with opened as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_manifest(m: Manifest) -> None:
    """Check every shard's byte size and sha256; raise ShardError naming the first bad shard."""
    for s in m.shards:
        p = m.url(s)
        if not os.path.exists(p):
            raise ShardError(f"shard {s.name}: missing file {p}")
        size = os.path.getsize(p)
        if size != s.bytes:
            raise ShardError(f"shard {s.name}: size expected {s.bytes} bytes, found {size} ({p})")
        digest = file_sha256(p)
        if digest != s.sha256:
            raise ShardError(f"shard {s.name}: sha256 expected {s.sha256}, found {digest} ({p})")


# --------------------------------------------------------------------------- reading

def sample_from_fields(fields: dict[str, bytes], key: str, shard: ShardInfo, position: int) -> RawSample:
    """Build a RawSample from one tar sample's members, checking fields and the sample id.

    ``position`` is the sample's index inside the shard; its ``sid`` must equal
    ``shard.first_id + position``.
    """
    where = f"shard {shard.name} key {key}"
    exts = [e for e in IMAGE_EXTS if e in fields]
    if len(exts) != 1:
        raise ShardError(f"{where}: expected exactly one image field of {IMAGE_EXTS}, found {sorted(fields)}")
    for name in ("cls", "sid"):
        if name not in fields:
            raise ShardError(f"{where}: missing field '{name}' (found {sorted(fields)})")
    try:
        label = int(fields["cls"])
        sid = int(fields["sid"])
    except ValueError as exn:
        raise ShardError(f"{where}: bad cls/sid text: {exn}") from None
    if sid != shard.first_id + position:
        raise ShardError(f"{where}: sid {sid} at position {position}, expected {shard.first_id + position}")
    return RawSample(sample_id=sid, key=key, label=label, data=fields[exts[0]], ext=exts[0], shard=shard.name)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.ext`` -> (``dir/key``, ``ext``); the WebDataset rule (key ends at the first dot)."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext


def read_shard(url: str, shard: ShardInfo, verify: bool = False) -> list[RawSample]:
    """Read one whole shard into RawSamples, in shard order.

    Raises ShardError naming the shard (and key where known) for a missing file, a truncated
    or unreadable tar, a missing field, a sid that is not ``first_id + position`` or a sample
    count different from the manifest. ``verify=True`` also checks the sha256 first.
    """
    if not os.path.exists(url):
        raise ShardError(f"shard {shard.name}: missing file {url}")
    if verify:
        digest = file_sha256(url)
        if digest != shard.sha256:
            raise ShardError(f"shard {shard.name}: sha256 expected {shard.sha256}, found {digest} ({url})")
    groups: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(url, "r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise ShardError(f"shard {shard.name} key {key}: truncated member {member.name}")
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext] = data
    except (tarfile.TarError, OSError, EOFError) as exn:
        last = groups[-1][0] if groups else None
        raise ShardError(f"shard {shard.name}: unreadable or truncated tar ({exn}); last key read: {last}") from exn
    samples = [sample_from_fields(fields, key, shard, i) for i, (key, fields) in enumerate(groups)]
    if len(samples) != shard.count:
        raise ShardError(f"shard {shard.name}: {len(samples)} samples, manifest says {shard.count} "
                         f"(truncated tar?) ({url})")
    return samples


def decode_image(raw: RawSample, exif_transpose: bool = True) -> Image.Image:
    """Decode a sample's bytes into 8-bit RGB (``pipeline.decode.decode``); SampleError naming shard/key."""
    try:
        return decode(raw.data, exif_transpose)
    except DecodeError as exn:
        raise SampleError(f"shard {raw.shard or '?'} key {raw.key} (sample_id {raw.sample_id}): "
                          f"cannot decode {raw.ext}: {exn}", shard=raw.shard, key=raw.key) from exn


# --------------------------------------------------------------------------- writing

def sanitize_key(key: str) -> str:
    """Make a WebDataset-safe key: no dots (the key ends at the first dot), no spaces/slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", key)


def encode_for_shard(data: bytes, origin: str) -> tuple[bytes, str]:
    """Validate encoded image bytes by decoding them the plan's way; return (bytes, ext).

    JPEG, PNG and WebP bytes are kept as they are (the ImageNet convention); any other format
    Pillow reads (TIFF, BMP, PPM, GIF, ...) is re-encoded as lossless PNG in its own mode where
    PNG has one (16-bit gray, alpha, palette stay), with the EXIF orientation applied, because
    the PNG loses the tag. Raises SampleError naming ``origin`` if the image cannot be decoded.
    """
    try:
        decode(data)  # the same rule the replay applies: what passes here decodes there
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
    """Writes consecutive shards of exactly ``shard_size`` samples into ``split_dir``."""

    def __init__(self, split_dir: Path, split: str, shard_size: int):
        self.split_dir, self.split, self.shard_size = split_dir, split, shard_size
        self.shards: list[ShardInfo] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.keys: set[str] = set()
        self.labels: Counter = Counter()

    def add(self, key: str, label: int, data: bytes, ext: str, sample_id: int) -> None:
        if self.tar is None:
            self.path = self.split_dir / shard_name(self.split, len(self.shards))
            self.tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
            self.count, self.keys, self.labels = 0, set(), Counter()
        if key in self.keys:
            raise ShardError(f"duplicate key {key!r} in shard {shard_name(self.split, len(self.shards))}")
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
        self.tar = None
        index = len(self.shards)
        self.shards.append(ShardInfo(name=self.path.name, index=index, first_id=index * self.shard_size,
                                     count=self.count, bytes=self.path.stat().st_size,
                                     sha256=file_sha256(self.path), class_counts=tuple(sorted(self.labels.items()))))

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def shuffled(items: Sequence, seed: int) -> list:
    """``items`` in a seeded order (Philox keyed on ``seed``; no global RNG)."""
    key = np.random.SeedSequence((0x6B645F6D, int(seed))).generate_state(2, np.uint64)  # "kd_m"
    perm = np.random.Generator(np.random.Philox(key=key)).permutation(len(items))
    return [items[i] for i in perm.tolist()]


def manifest_dict(split: str, classes: Sequence[str], shard_size: int, shards: Sequence[ShardInfo],
                  skipped: list[dict], source: Any, order: dict) -> dict:
    """The JSON content of ``manifest.json`` (format MANIFEST_VERSION)."""
    return {
        "version": MANIFEST_VERSION, "split": split, "num_samples": sum(s.count for s in shards),
        "num_classes": len(classes), "classes": list(classes), "shard_size": shard_size, "order": order,
        "shards": [{"name": s.name, "count": s.count, "first_id": s.first_id, "bytes": s.bytes,
                    "sha256": s.sha256,
                    "class_counts": None if s.class_counts is None else [list(c) for c in s.class_counts]}
                   for s in shards],
        "skipped": skipped, "source": source,
    }


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
) -> Manifest:
    """Write ``samples`` as ``<out_dir>/<split>/<split>-%06d.tar`` shards plus ``manifest.json``.

    The split is written into ``<out_dir>/.<split>.partial-<pid>/`` and moved into place only
    when complete, so a failed or killed run never leaves a half-written split (a later run
    removes the stale partial folder).

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

    Returns:
        The loaded Manifest.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    split_dir = out_dir / split
    if split_dir.exists() and any(split_dir.iterdir()) and not overwrite:
        what = "a complete split" if (split_dir / MANIFEST_NAME).exists() else "files but no manifest"
        raise FileExistsError(f"{split_dir} already holds {what} (use overwrite / --overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_partials(out_dir, split)
    partial = out_dir / f".{split}.partial-{os.getpid()}"
    partial.mkdir()
    if shuffle_seed is not None:
        samples = shuffled(list(samples), shuffle_seed)
    writer = _ShardWriter(partial, split, shard_size)
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
                data, ext = encode_for_shard(data, s.path)
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
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        _move_into_place(partial, split_dir)
    except BaseException:
        writer.abort()
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
    if any(s.class_counts is None for s in m.shards) or m.num_samples < 2:
        return None
    totals: Counter = Counter()
    for s in m.shards:
        for label, c in s.class_counts:
            totals[label] += c
    n = m.num_samples
    sizes = {s.count: expected_distinct(list(totals.values()), s.count) for s in m.shards}
    distinct = [len(s.class_counts) for s in m.shards]
    expected = [sizes[s.count] for s in m.shards]
    pairs = [(sum(c * (c - 1) for _, c in s.class_counts), s.count * (s.count - 1)) for s in m.shards]
    random_pair = sum(c * (c - 1) for c in totals.values()) / (n * (n - 1))
    worst = sorted(range(len(m.shards)), key=lambda i: distinct[i] / expected[i])[:3]
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
        yield from read_shard(m.url(s), s, verify=verify)
