"""Shards and manifests wherever users keep them (pipeline/urls.py).

The same Fashion-MNIST split read from a local path, a ``file://`` URL, an HTTP server and the
local S3 server (both on 127.0.0.1, stopped by the tests), fsspec's ``memory://`` and a
``pipe:cat`` command (indexed with ``make_shards index``) gives the same samples, the same
replayed pixels (loader worker processes included) and the same cache rows (the caching job's
per-item work: feed, premix workers, tail calibration). ``make_shards --out s3://...`` writes
byte-identical shards, with the manifest as the completion marker.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import urls
from teacher.job import CacheJobConfig, cache_attrs, make_teacher, open_writer
from pipeline.index import index_shards
from pipeline.loader import LoaderConfig, ReplayLoader
from pipeline.schedule import Schedule
from conftest import verify_manifest
from pipeline.errors import ShardError
from pipeline.manifest import load_manifest
from pipeline.shards import iter_samples, read_shard
from teacher.work import run_item
from servers import http_server, new_bucket
from storage import open_cache
from teacher.model import TeacherConfig, create_model
from test_student_data import AUG, TINY_TEACHER

REPO = Path(__file__).resolve().parents[1]
SEED, VIEWS = 3, 2


@pytest.fixture(scope="module")
def places(fmnist_shards, s3_endpoint, tmp_path_factory):
    """The train split (4 shards x 64) at every kind of place: name -> manifest folder."""
    import fsspec

    local = fmnist_shards / "train"
    files = sorted(local.iterdir())
    bucket = new_bucket("kdcache-urls")
    memory = fsspec.filesystem("memory")
    for f in files:
        fsspec.filesystem("s3").put_file(str(f), f"{bucket[5:]}/fmnist/train/{f.name}")
        memory.pipe_file(f"/kdcache-urls/train/{f.name}", f.read_bytes())
    pipe = tmp_path_factory.mktemp("pipe") / "train"
    index_shards(f"pipe:cat {local}/train-{{000000..000003}}.tar", str(pipe))
    with http_server(fmnist_shards) as base:
        yield {"path": str(local), "file": f"file://{local}", "http": f"{base}/train",
               "s3": f"{bucket}/fmnist/train", "memory": "memory://kdcache-urls/train", "pipe": str(pipe)}
    memory.rm("/kdcache-urls", recursive=True)


def test_same_samples_from_every_place(places):
    ref = load_manifest(places["path"])
    ref_samples = [(s.sample_id, s.key, s.label, s.data) for s in iter_samples(ref)]
    for name, where in places.items():
        m = load_manifest(where)
        if name != "pipe":  # the pipe: manifest is an index of the same shards, written here
            assert m.sha256 == ref.sha256, name
            verify_manifest(m)
        got = [(s.sample_id, s.key, s.label, s.data) for s in iter_samples(m, verify=True)]
        assert got == ref_samples, name
    assert [s.url for s in load_manifest(places["pipe"]).shards][0] == f"pipe:cat {places['path']}/train-000000.tar"


def _pixels(where: str, workers: int) -> dict:
    """(sample_id, view) -> replayed image of cache epoch 0 (2 views, all rows), through the loader."""
    m = load_manifest(where)
    schedule = Schedule(m.shards, views=VIEWS, cached_epochs=1, seed=SEED)
    from pipeline.plan import AugConfig

    cfg = LoaderConfig(batch_size=64, out_size=28, num_workers=workers, interleave=2)
    out = {}
    for t in range(VIEWS):   # both student epochs of cache epoch 0: every row
        loader = ReplayLoader(m, AugConfig.from_dict(AUG), SEED,
                              schedule.order(t, 0, 1, 64, lanes=cfg.lanes, interleave=2), cfg)
        for b in loader:
            for sid, view, image in zip(b["sample_id"].tolist(), b["view"].tolist(), b["image"]):
                out[sid, view] = image
        assert not loader.skipped
    return out


def test_same_replayed_pixels_from_every_place(places):
    ref = _pixels(places["path"], 0)
    assert len(ref) == 256 * VIEWS
    for name, where in places.items():
        # loader worker processes read http and s3 themselves; memory:// lives in this process only
        got = _pixels(where, 0 if name in ("path", "memory") else 1)
        assert got.keys() == ref.keys(), name
        for key, image in ref.items():
            assert torch.equal(got[key], image), (name, key)


def _cache_rows(where: str, out: Path, weights: Path, workers: int):
    cfg = CacheJobConfig.from_dict({
        "shards": where, "out": str(out), "epochs": 1, "views": VIEWS, "k": 3, "seed": SEED, "batch_size": 64,
        "num_workers": workers, "aug": AUG, "teacher": {**TINY_TEACHER, "checkpoint": str(weights)},
        "tail": {"dim": 4, "calibration_rows": 128}})
    m = load_manifest(where)
    teacher, writer = make_teacher(cfg), open_writer(cfg, m, cache_attrs(cfg, m))
    for s in range(len(m.shards)):
        assert run_item(cfg, 0, s, teacher=teacher, writer=writer, manifest=m).skipped == []
    r = open_cache(out)
    ids, views = np.repeat(np.arange(m.num_samples), VIEWS), np.tile(np.arange(VIEWS), m.num_samples)
    rows = r.lookup_rows(0, ids, views)
    assert rows.valid.all()
    return rows, r.group["tail_basis"][:]


def test_same_cache_rows_from_every_place(places, tmp_path):
    weights = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model(TeacherConfig.from_dict(TINY_TEACHER)).state_dict(), weights)
    (ref, ref_basis) = _cache_rows(places["path"], tmp_path / "path.zarr", weights, 0)
    for name in ("file", "http", "s3", "pipe"):
        # the feed's replay workers (2 processes) for s3; calibration reads the shards too
        rows, basis = _cache_rows(places[name], tmp_path / f"{name}.zarr", weights, 2 if name == "s3" else 0)
        np.testing.assert_array_equal(basis, ref_basis, err_msg=name)
        for field, a, b in zip(rows._fields, rows, ref):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: {field}")


def test_missing_or_failing_shards_are_named(places, tmp_path):
    m = load_manifest(places["http"])
    gone = m.shards[2].__class__(**{**m.shards[2].__dict__, "name": "train-000009.tar"})
    with pytest.raises(ShardError, match="shard train-000009.tar: missing file http://127.0.0.1"):
        read_shard(m, gone)
    p = load_manifest(places["pipe"])
    failing = p.shards[1].__class__(**{**p.shards[1].__dict__, "url": f"pipe:cat {tmp_path}/nowhere.tar"})
    with pytest.raises(ShardError, match="shard train-000001.tar: .*exit 1"):
        read_shard(p, failing)


def _make_shards(src: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.make_shards", "imagefolder", "--train-dir", str(src),
                           "--out", out, "--shard-size", "5", *extra], cwd=REPO, capture_output=True, text=True)


def test_make_shards_to_s3_manifest_written_last(s3_endpoint, tmp_path, make_imagefolder):
    """Same bytes as a local run; a split without its manifest (a killed run) is incomplete and the
    next run rewrites it, removing its stale shards; a complete split is kept."""
    import s3fs

    src = make_imagefolder(tmp_path / "src")
    assert _make_shards(src, str(tmp_path / "local")).returncode == 0
    local = load_manifest(tmp_path / "local" / "train")
    bucket = new_bucket("kdcache-make-shards")
    out = f"{bucket}/ds"
    r = _make_shards(src, out)
    assert r.returncode == 0, r.stderr
    m = load_manifest(f"{out}/train")
    assert m.sha256 == local.sha256 and m.path == f"{out}/train"
    verify_manifest(m)

    fs = s3fs.S3FileSystem()
    fs.rm(f"{out[5:]}/train/manifest.json")               # as if killed before its last write
    fs.pipe_file(f"{out[5:]}/train/train-000042.tar", b"left over by the killed run")
    with pytest.raises(ShardError, match="no manifest"):
        load_manifest(f"{out}/train")
    r = _make_shards(src, out)
    assert r.returncode == 0, r.stderr
    assert load_manifest(f"{out}/train").sha256 == local.sha256
    assert not urls.exists(f"{out}/train/train-000042.tar")
    r = _make_shards(src, out)
    assert r.returncode == 0 and "complete from an earlier run of this command, kept" in r.stdout

    (src / "dog" / "dog_9.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # fails mid-run: no manifest appears
    r = _make_shards(src, f"{bucket}/broken")
    assert r.returncode == 2 and "dog_9.jpg" in r.stderr
    assert not urls.exists(f"{bucket}/broken/train/manifest.json")
