"""Reading WebDataset shards: tar members grouped into samples, labels, stable sample ids.

Each sample in a tar has the members ``<key>.jpg|jpeg|png|webp`` (encoded image) and a label:
``<key>.cls`` (decimal text), else the ``label`` field of ``<key>.json`` (or the manifest's
``label_key`` field, which then is the only label read), else ``<key>.txt`` (decimal text or a
class name of the manifest's class list). ``make_shards`` also writes ``<key>.sid`` (the sample
id as decimal text, checked when present). Member extensions are compared in lower case and a
key ends at the first dot of the member's base name (the WebDataset rules).

A shard is read whole, front to back, from wherever it lives (``pipeline.urls``), against its
manifest entry (``pipeline.manifest``). A sample the manifest lists as bad keeps its id and is
handed out as a :class:`RawSample` with ``error`` set, so the caching job and the student treat
it like a corrupt image (a missing row, recorded), never dropped silently.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from pipeline import urls
from pipeline.errors import SampleError, ShardError
from pipeline.manifest import Manifest, ShardInfo

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tar member extensions read as the image
JSON_LABEL_KEY = "label"  # the .json field holding the class index by default (timm's imagenet-1k-wds)


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


def iter_samples(m: Manifest, verify: bool = False) -> Iterator[RawSample]:
    """All RawSamples of a split in sample-id order (reads shard by shard)."""
    for s in m.shards:
        yield from read_shard(m, s, verify=verify)
