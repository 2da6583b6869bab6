"""WebDataset shards with stable sample ids, and their manifest.

Layout (one folder per split)::

    <out>/<split>/<split>-000000.tar     # exactly ``shard_size`` samples (the last may hold fewer)
    <out>/<split>/manifest.json          # shard names, counts, first ids, bytes, sha256, classes

Each sample in a tar has the members ``<key>.jpg`` or ``<key>.png`` (encoded image),
``<key>.cls`` (label as decimal text) and ``<key>.sid`` (sample id as decimal text).
``sample_id`` is the global position in manifest order, so shard ``i`` starts at
``i * shard_size``; storage chunks rely on that fixed size.

Writing keeps original JPEG/PNG bytes (the ImageNet convention) after checking that they
decode; other formats are re-encoded as PNG (lossless). Tar members carry fixed metadata,
so writing the same source twice gives byte-identical shards and manifest checksums.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
IMAGE_EXTS = ("jpg", "png")


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
    if d.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: version: expected {MANIFEST_VERSION}, found {d.get('version')}")
    shards = [ShardInfo(name=s["name"], index=i, first_id=s["first_id"], count=s["count"],
                        bytes=s["bytes"], sha256=s["sha256"]) for i, s in enumerate(d["shards"])]
    m = Manifest(split=d["split"], num_samples=d["num_samples"], num_classes=d["num_classes"],
                 classes=list(d["classes"]), shard_size=d["shard_size"], shards=shards,
                 skipped=list(d.get("skipped", [])), source=d.get("source"),
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


def decode_image(raw: RawSample) -> Image.Image:
    """Decode a sample's bytes fully into an RGB PIL image; SampleError naming shard/key if corrupt."""
    try:
        with Image.open(io.BytesIO(raw.data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise SampleError(f"shard {raw.shard or '?'} key {raw.key} (sample_id {raw.sample_id}): "
                          f"cannot decode {raw.ext}: {type(exn).__name__}: {exn}",
                          shard=raw.shard, key=raw.key) from exn


# --------------------------------------------------------------------------- writing

def sanitize_key(key: str) -> str:
    """Make a WebDataset-safe key: no dots (the key ends at the first dot), no spaces/slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", key)


def encode_for_shard(data: bytes, origin: str) -> tuple[bytes, str]:
    """Validate encoded image bytes by decoding; return (bytes, ext).

    JPEG and PNG bytes are kept as they are; any other readable format is re-encoded as PNG.
    Raises SampleError naming ``origin`` if the image cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            if fmt == "JPEG":
                return data, "jpg"
            if fmt == "PNG":
                return data, "png"
            rgb = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    except Exception as exn:
        raise SampleError(f"{origin}: cannot decode image: {type(exn).__name__}: {exn}", path=origin) from exn
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), "png"


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
    """Writes consecutive shards of exactly ``shard_size`` samples, via temp file + rename."""

    def __init__(self, split_dir: Path, split: str, shard_size: int):
        self.split_dir, self.split, self.shard_size = split_dir, split, shard_size
        self.shards: list[ShardInfo] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.keys: set[str] = set()

    def add(self, key: str, label: int, data: bytes, ext: str, sample_id: int) -> None:
        if self.tar is None:
            index = len(self.shards)
            self.tmp = self.split_dir / (shard_name(self.split, index) + ".tmp")
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
            self.count, self.keys = 0, set()
        if key in self.keys:
            raise ShardError(f"duplicate key {key!r} in shard {shard_name(self.split, len(self.shards))}")
        self.keys.add(key)
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
        name = shard_name(self.split, index)
        final = self.split_dir / name
        os.replace(self.tmp, final)
        self.shards.append(ShardInfo(name=name, index=index, first_id=index * self.shard_size,
                                     count=self.count, bytes=final.stat().st_size, sha256=file_sha256(final)))

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
            self.tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[SourceSample],
    out_dir: str | os.PathLike,
    split: str,
    classes: Sequence[str],
    shard_size: int,
    *,
    skip_bad: bool = False,
    source: Any = None,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> Manifest:
    """Write ``samples`` as ``<out_dir>/<split>/<split>-%06d.tar`` shards plus ``manifest.json``.

    Args:
        samples: SourceSamples in the order that defines sample ids (label in [0, len(classes))).
        out_dir: dataset root; the split folder is created under it.
        split: split name ("train", "val", ...), used for folder and shard names.
        classes: class names; index = label.
        shard_size: samples per shard (every shard but the last holds exactly this many).
        skip_bad: record undecodable/unreadable images in ``manifest["skipped"]`` (path + error)
            instead of raising SampleError naming the file.
        source: free-form description of the source, stored in the manifest.
        overwrite: replace an existing split folder's shards and manifest.
        progress: optional wrapper for the sample iterator (e.g. ``tqdm``).

    Returns:
        The loaded Manifest (written last, so a crash never leaves a valid-looking split).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(split_dir.glob(f"{split}-*.tar")) + [split_dir / MANIFEST_NAME]
    if any(p.exists() for p in old):
        if not overwrite:
            raise FileExistsError(f"{split_dir} already holds shards or a manifest (use overwrite / --overwrite)")
        for p in old:
            p.unlink(missing_ok=True)
    writer = _ShardWriter(split_dir, split, shard_size)
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
    except BaseException:
        writer.abort()
        raise
    if n == 0:
        raise ShardError(f"{split_dir}: no samples to write for split {split!r}")
    manifest = {
        "version": MANIFEST_VERSION, "split": split, "num_samples": n, "num_classes": len(classes),
        "classes": list(classes), "shard_size": shard_size,
        "shards": [{"name": s.name, "count": s.count, "first_id": s.first_id, "bytes": s.bytes,
                    "sha256": s.sha256} for s in writer.shards],
        "skipped": skipped, "source": source,
    }
    tmp = split_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, split_dir / MANIFEST_NAME)
    return load_manifest(split_dir)


def iter_samples(m: Manifest, verify: bool = False) -> Iterator[RawSample]:
    """All RawSamples of a split in sample-id order (reads shard by shard)."""
    for s in m.shards:
        yield from read_shard(m.url(s), s, verify=verify)
