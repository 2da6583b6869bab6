"""Where data lives: a local path, any fsspec URL, or a webdataset ``pipe:`` command.

Shards and manifests are named by one string everywhere (configs, manifests, CLIs):

* a local path (``/data/imagenet-wds/train``) or ``file://`` URL: plain files;
* an fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``, ...): through fsspec, with
  the protocol's package installed (``s3fs`` ships with kdcache; ``gcsfs`` for ``gs://``);
* ``pipe:COMMAND`` (read only, the webdataset convention): the command's stdout, e.g.
  ``pipe:aws s3 cp s3://bucket/train-000001.tar -``; a non-zero exit status is an error.

Credentials never go into configs: fsspec and the cloud SDKs find them where they always do
(``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``, instance roles), and
fsspec's configuration supplies per-protocol options, e.g. ``FSSPEC_S3_ENDPOINT_URL`` for an
S3-compatible server (MinIO, Ceph) or ``~/.config/fsspec/s3.json``.

Shards are read front to back once, so HTTP(S) is opened as one streaming GET (no range
requests), and every reader can hash what passes through (:class:`HashingReader`): a shard's
sha256 costs no second read.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from typing import BinaryIO

import fsspec

PIPE = "pipe:"


def is_local(url: str | os.PathLike) -> bool:
    """True for a plain path or a ``file://`` URL."""
    url = os.fspath(url)
    return url.startswith("file://") or ("://" not in url and not url.startswith(PIPE))


def local_path(url: str | os.PathLike) -> str:
    """The file-system path of a local path or ``file://`` URL."""
    url = os.fspath(url)
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local path or a URL (a ``pipe:`` command names one stream, not a folder)."""
    base = os.fspath(base)
    if base.startswith(PIPE):
        raise ValueError(f"{base}: a pipe: command names one shard, not a folder")
    if "://" not in base:
        return os.path.join(base, name)
    return base.rstrip("/") + "/" + name


def basename(url: str) -> str:
    """The last path component (of the command's last word for ``pipe:``)."""
    if url.startswith(PIPE):
        words = shlex.split(url[len(PIPE):]) or [url]
        url = next((w for w in reversed(words) if w != "-"), words[-1])
    return url.rstrip("/").rsplit("/", 1)[-1]


def absolute(url: str | os.PathLike) -> str:
    """Local paths made absolute; URLs and commands as they are."""
    url = os.fspath(url)
    return os.path.abspath(url) if "://" not in url and not url.startswith(PIPE) else url


# Listings are not cached: other processes write shards and manifests (make_shards, a re-run),
# and a cached listing makes fsspec report a file that appeared since as missing.
_OPTIONS = {"use_listings_cache": False}


def _fs(url: str):
    return fsspec.core.url_to_fs(url, **_OPTIONS)


def open_read(url: str) -> BinaryIO:
    """A binary stream of ``url`` (raises FileNotFoundError when there is nothing there)."""
    if url.startswith(PIPE):
        import webdataset as wds  # only for pipe: commands; importing it costs ~1.5 s (it loads torch)

        return wds.gopen(url, "rb")
    if is_local(url):
        return open(local_path(url), "rb")
    # block_size=0: one streaming GET; a shard is read once, front to back
    options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fsspec.open(url, "rb", **options, **_OPTIONS).open()


def open_write(url: str) -> BinaryIO:
    """A binary stream writing ``url`` (local parent folders are created)."""
    if url.startswith(PIPE):
        raise ValueError(f"{url}: pipe: commands are read only; write to a path or an fsspec URL")
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return open(path, "wb")
    return fsspec.open(url, "wb", **_OPTIONS).open()


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Write ``url`` whole: a local file through a temporary file and a rename, an object in one PUT,
    so a reader never sees a partial file."""
    if not is_local(url):
        with open_write(url) as f:
            f.write(data)
        return
    path = local_path(url)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = _fs(url)
    return fs.exists(path)


def list_names(url: str) -> list[str]:
    """Names of the entries directly under the folder ``url`` ([] if there is none)."""
    if is_local(url):
        path = local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = _fs(url)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def remove(url: str) -> None:
    """Delete one file at ``url`` if it exists."""
    if is_local(url):
        if os.path.exists(local_path(url)):
            os.unlink(local_path(url))
        return
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path)


class HashingReader:
    """A read-only stream that counts and (unless ``sha256=False``) hashes the bytes read through it."""

    def __init__(self, stream: BinaryIO, sha256: bool = True):
        self.stream = stream
        self.bytes = 0
        self._sha = hashlib.sha256() if sha256 else None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.bytes += len(data)
        if self._sha is not None:
            self._sha.update(data)
        return data

    def drain(self) -> None:
        """Read to the end (a tar reader stops at its end-of-archive blocks)."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self._sha.hexdigest() if self._sha is not None else ""


class HashingWriter:
    """A write-only stream that counts and hashes what goes through it (``tell`` for tarfile)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.bytes = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.stream.write(data)
        self.bytes += len(data)
        self._sha.update(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def file_sha256(url: str | os.PathLike) -> str:
    """sha256 hex of the file at a local path, fsspec URL or ``pipe:`` command."""
    with open_read(os.fspath(url)) as f:
        reader = HashingReader(f)
        reader.drain()
    return reader.hexdigest()


def expand(patterns: str | list[str]) -> list[str]:
    """Shard URLs from brace patterns (``train-{000000..001281}.tar``, the webdataset notation)."""
    # optional here: braceexpand comes with webdataset, which the per-item work does not need (a GPU
    # box that runs bench/gpu.py has torch and timm only); only `make_shards index` expands patterns
    from braceexpand import braceexpand

    out: list[str] = []
    for p in [patterns] if isinstance(patterns, str) else patterns:
        out += list(braceexpand(p))
    return out
