"""Shared test fixtures: small real data made on the fly (offline, ~1 s to build).

* ``fmnist_shards``: Fashion-MNIST slice as shards (256 train / 128 val, shard_size 64) from
  the Debian IDX files; fails when they are absent (``tests/fmnist.py``: where and why).
* ``make_imagefolder``: builder for a tiny RGB ImageFolder tree (JPEG + PNG files).
* ``rgb_shards``: such a tree (3 classes x 7 images) written as a ``train`` split, shard_size 8.
* ``s3_endpoint``: a local S3 server (moto, 127.0.0.1) for the session, found through the
  environment as a user's own would be (``tests/servers.py``).

Ray: for the whole session (this process, its subprocesses and their Ray workers) token
authentication is on with a token made for the session in a temporary folder
(``RAY_AUTH_TOKEN_PATH``; ``~/.ray`` is never read or written), and ``RAY_ADDRESS=local``, so
every job the suite starts runs on a fresh local instance, never on a ``ray start`` cluster
that happens to run on the machine. A test that joins a cluster names its address.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist import require_fmnist
from hygiene import pytest_sessionfinish, pytest_sessionstart  # noqa: F401  (hooks: no side effects)
from pipeline import urls
from pipeline.errors import ShardError

_RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
_ray_saved: dict[str, str | None] = {}


def pytest_configure(config):
    """Session Ray settings (module docstring), set before any test module is imported."""
    from teacher.ray_env import private_ray_env

    _ray_saved.update({k: os.environ.get(k) for k in _RAY_ENV})
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(private_ray_env(tempfile.mkdtemp(prefix="kdcache_ray_auth_")))


def pytest_unconfigure(config):
    token = os.environ.get("RAY_AUTH_TOKEN_PATH")
    for key, value in _ray_saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if token and Path(token).name == "auth_token" and Path(token).parent.name.startswith("kdcache_ray_auth_"):
        shutil.rmtree(Path(token).parent, ignore_errors=True)


def build_imagefolder(root, classes=("cat", "dog", "eel"), per_class=4, size=(24, 18), seed=0):
    """Write ``root/<class>/<class>_<i>.{jpg|png}`` images (even i JPEG, odd i PNG) and return root.

    Pixels are seeded noise plus a class-dependent tint, so images differ and decode exactly
    (PNG) or deterministically (JPEG).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size[0] + i, size[1] + 2 * c   # varied sizes/aspect ratios
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            arr[..., c % 3] //= 2
            ext = "jpg" if i % 2 == 0 else "png"
            Image.fromarray(arr).save(root / name / f"{name}_{i}.{ext}", quality=90)
    return root


def verify_manifest(m) -> None:
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


@pytest.fixture
def make_imagefolder():
    """Builder ``make_imagefolder(root, classes=..., per_class=..., size=(w, h), seed=...) -> root``."""
    return build_imagefolder


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> Path:
    """Dataset root with ``train`` (256 samples) and ``val`` (128) split folders, shard_size 64."""
    fmnist_dir = require_fmnist()
    from pipeline.make_shards import main

    out = tmp_path_factory.mktemp("fmnist_shards")
    main(["fmnist", "--out", str(out), "--dir", fmnist_dir, "--limit-train", "256",
          "--limit-val", "128", "--shard-size", "64"])
    return out


@pytest.fixture(scope="session")
def rgb_shards(tmp_path_factory) -> Path:
    """Dataset root with a ``train`` split of 3 classes x 7 images (JPEG+PNG, RGB), shard_size 8
    (shards of 8, 8, 5 samples)."""
    from pipeline.make_shards import imagefolder_samples, scan_imagefolder
    from pipeline.writer import write_shards

    base = tmp_path_factory.mktemp("rgb")
    src = build_imagefolder(base / "src" / "train", per_class=7)
    classes, files = scan_imagefolder(src)
    write_shards(imagefolder_samples(src, files), base / "shards", "train", classes, 8, source="rgb fixture")
    return base / "shards"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (``FSSPEC_S3_ENDPOINT_URL`` and test ``AWS_*`` credentials set
    while it runs); stopped at the end of the session."""
    from servers import s3_server

    with s3_server() as endpoint:
        yield endpoint


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip cleanly, saying why, where CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
