"""A cache as a published artifact (storage/pack.py): pack, serve over HTTP (127.0.0.1, range
requests) and S3 (moto), read back identical rows, train a student from the URL, name a corrupted
byte range, refuse an unfinished cache, fetch only the epochs read, resume an interrupted pack.

Synthetic caches go through the real writer (``create_cache``/``write_item`` with full logits and a
learned tail); the student tests use the tiny Fashion-MNIST cache of test_student_data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from servers import http_server, new_bucket
from storage import CacheCorruptError, CacheMismatchError, create_cache, open_cache
from storage.cache import EpochNotInCache
from storage.pack import CacheNotFinished, pack, verify
from storage.tail import TailModel
from teacher.fidelity import item_record

SHARDS = [(0, 8), (8, 8), (16, 5)]
N, EPOCHS, VIEWS, K, C, D = 21, 4, 2, 4, 50, 4
ATTRS = {"teacher": "regnety_160", "checkpoint_sha256": "c" * 64, "fingerprint": "f" * 64,
         "manifest_sha256": "m" * 64, "seed": 3, "k": K}


def _write_cache(path, items=None) -> None:
    """A 4-epoch cache with a learned tail; ``items`` (default all) are written; one row is missing."""
    rng = np.random.default_rng(0)
    w = create_cache(path, shards=SHARDS, epochs=EPOCHS, views=VIEWS, k=K, num_classes=C, attrs=ATTRS, tail_dim=D)
    w.write_tail(TailModel.fit(rng.normal(size=(64, C)).astype(np.float32), D, 0.05))
    for e, s in items if items is not None else [(e, s) for e in range(EPOCHS) for s in range(len(SHARDS))]:
        first, count = SHARDS[s]
        ids, views = np.repeat(np.arange(first, first + count), VIEWS), np.tile(np.arange(VIEWS), count)
        ids, views = (ids[1:], views[1:]) if (e, s) == (1, 1) else (ids, views)
        logits = (np.random.default_rng([e, s]).normal(size=(len(ids), C)) * 3).astype(np.float32)
        top = np.argsort(-logits, 1)[:, :K]
        lp = np.take_along_axis(logits, top, 1) - np.log(np.exp(logits).sum(1))[:, None]
        missing = [{"shard": s, "key": f"k{first}", "epoch": e, "view": 0, "reason": "test"}] if (e, s) == (1, 1) else []
        w.write_item(e, s, ids, views, lp, top, missing=missing, logits=logits, fidelity=item_record(w, logits))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "cache.zarr"
    _write_cache(path)
    return path


@pytest.fixture(scope="module")
def packed(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "cache.zarr"
    pack(str(cache), str(out), log=None)
    return out


def _all_rows():
    return np.repeat(np.arange(N), VIEWS), np.tile(np.arange(VIEWS), N)


def _assert_same_cache(a, b, epochs=range(EPOCHS)):
    """Same attrs, layout, rows (every field of every (epoch, sample, view)), records and fidelity."""
    assert a.attrs == b.attrs and a.layout == b.layout
    ids, views = _all_rows()
    for e in epochs:
        for x, y in zip(a.lookup_rows(e, ids, views), b.lookup_rows(e, ids, views)):
            np.testing.assert_array_equal(x, y)
        bulk = open_cache(b.path)
        bulk.preload(e)  # runs of items per read give the same rows as item by item
        for x, y in zip(a.lookup_rows(e, ids, views), bulk.lookup_rows(e, ids, views)):
            np.testing.assert_array_equal(x, y)
    assert [r for r in a.missing_records() if r["epoch"] in epochs] == b.missing_records()
    np.testing.assert_array_equal(a.tail_model().basis, b.tail_model().basis)
    if list(epochs) == list(range(EPOCHS)):
        assert a.fidelity() == b.fidelity()


def test_packed_copy_is_few_files_listed_in_its_manifest(cache, packed):
    manifest = json.loads((packed / "pack.json").read_text())
    files = sorted(str(p.relative_to(packed)) for p in packed.rglob("*") if p.is_file())
    assert files == sorted(list(manifest["files"]) + ["pack.json"])
    # per epoch one file per row array (prob, index, tail_mass, tail_code, valid) and one done chunk
    assert sum(1 for f in files if "/c/2/" in f or f.startswith("done/c/2/")) == 6
    assert manifest["epochs"] == [0, 1, 2, 3] and manifest["rows"] == EPOCHS * N * VIEWS
    assert verify(str(packed))["files"] == manifest["files"]
    card = (packed / "README.md").read_text()
    for text in ("regnety_160", "c" * 64, "m" * 64, "f" * 64, "| k | 4 |", "learned, 4 dims", "4 x 2 cached",
                 "TV at τ=3", "python -m student.train", f"cache.path={packed}"):
        assert text in card, text
    meta = json.loads((packed / "prob" / "zarr.json").read_text())
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["codecs"][-1]["name"] == "crc32c"
    assert sharding["configuration"]["index_codecs"][-1]["name"] == "crc32c"


def test_packed_reads_like_unpacked_local_and_http(cache, packed):
    _assert_same_cache(open_cache(cache), open_cache(packed))
    requests: list = []
    with http_server(packed.parent, requests) as base:
        reader = open_cache(f"{base}/cache.zarr", expect={"fingerprint": "f" * 64, "k": K})
        reader.lookup_rows(0, *_all_rows())  # item by item
        reader.lookup_rows(1, *_all_rows())
        item_requests = list(requests)
        _assert_same_cache(open_cache(cache), reader)
    # a whole epoch in one preload is one GET per file; item by item, ranges
    assert any(p.startswith("/cache.zarr/prob/c/2/") and a == 0 and b == os.path.getsize(packed / p[12:])
               for p, a, b in requests[len(item_requests):])
    requests = item_requests
    shard_reads = [(p, a, b) for p, a, b in requests if p.split("/")[2] in ("prob", "index", "tail_mass", "valid")]
    assert shard_reads and all(b - a < os.path.getsize(packed.parent / p.lstrip("/")) for p, a, b in shard_reads), \
        "shard files are read by range (their index, then one inner chunk per item)"
    assert not any(path.endswith("/") for path, _, _ in requests), "no listing"


def test_pack_to_s3_and_read_from_it(cache, s3_endpoint):
    bucket = new_bucket("kdcache-pack")
    pack(str(cache), f"{bucket}/cache.zarr", log=None)
    assert verify(f"{bucket}/cache.zarr")["rows"] == EPOCHS * N * VIEWS
    _assert_same_cache(open_cache(cache), open_cache(f"{bucket}/cache.zarr"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _inner_chunk(path: Path, shard: int) -> tuple[int, int]:
    """(offset, length) of inner chunk ``shard`` in a shard file (the index: 16 bytes per chunk, then crc32c)."""
    data = path.read_bytes()
    index = np.frombuffer(data[-(16 * len(SHARDS) + 4):-4], "<u8").reshape(-1, 2)
    return int(index[shard, 0]), int(index[shard, 1])


def test_flipped_byte_is_named_and_stops_the_read(packed, tmp_path):
    import shutil

    copy = tmp_path / "cache.zarr"
    shutil.copytree(packed, copy)
    target = copy / "prob" / "c" / "1" / "0" / "0" / "0"
    offset, length = _inner_chunk(target, 2)
    _flip(target, offset + length // 2)
    ids, views = _all_rows()
    with http_server(tmp_path) as base:
        reader = open_cache(f"{base}/cache.zarr")
        reader.lookup_rows(1, ids[:16], views[:16])  # shards 0 and 1 of epoch 1 are intact
        with pytest.raises(CacheCorruptError, match=r"file prob/c/1/0/0/0, epoch 1, shard 2: "):
            open_cache(f"{base}/cache.zarr").preload(1)  # one read of shards 0-2, then item by item
        with pytest.raises(CacheCorruptError, match=r"file prob/c/1/0/0/0, epoch 1, shard 2: .*checksum") as e:
            reader.lookup_rows(1, ids, views)
        assert (e.value.file, e.value.epoch, e.value.shard) == ("prob/c/1/0/0/0", 1, 2)
        with pytest.raises(RuntimeError, match="file prob/c/1/0/0/0"):
            verify(f"{base}/cache.zarr")
    # the shard index has its own crc32c: a flipped index byte is named too
    index_file = copy / "valid" / "c" / "3" / "0" / "0"
    _flip(index_file, os.path.getsize(index_file) - 10)
    with pytest.raises(CacheCorruptError, match=r"file valid/c/3/0/0, epoch 3, shard 0"):
        open_cache(copy).lookup_rows(3, ids, views)
    # a file the manifest lists but the server lacks is an error, not the fill value
    os.unlink(copy / "tail_mass" / "c" / "2" / "0" / "0")
    with pytest.raises(CacheCorruptError, match=r"file tail_mass/c/2/0/0, epoch 2, shard 0: .*missing"):
        open_cache(copy).lookup_rows(2, ids, views)


def test_unfinished_cache_is_refused_naming_the_items(tmp_path):
    src = tmp_path / "cache.zarr"
    items = [(e, s) for e in range(EPOCHS) for s in range(len(SHARDS)) if (e, s) not in {(2, 1), (3, 0)}]
    _write_cache(src, items)
    with pytest.raises(CacheNotFinished, match=r"2 of 12 items .* \(epoch 2, shard 1\), \(epoch 3, shard 0\)"):
        pack(str(src), str(tmp_path / "out.zarr"), log=None)
    assert not (tmp_path / "out.zarr").exists()
    # the finished epochs can be packed; the copy says which it holds and refuses the others
    pack(str(src), str(tmp_path / "sub.zarr"), epochs="0-1", log=None)
    reader = open_cache(tmp_path / "sub.zarr")
    assert reader.held_epochs == {0, 1} and reader.epochs == EPOCHS
    _assert_same_cache(open_cache(src), reader, epochs=[0, 1])
    with pytest.raises(EpochNotInCache, match=r"epoch 2 is not in this packed copy, which holds epochs 0-1 of 4"):
        reader.lookup_rows(2, *_all_rows())
    with pytest.raises(EpochNotInCache, match="epoch 3"):
        reader.is_done(3, 0)


def test_reading_epochs_0_1_over_http_fetches_nothing_of_epochs_2_3(packed):
    requests: list = []
    with http_server(packed.parent, requests) as base:
        reader = open_cache(f"{base}/cache.zarr")
        for e in (0, 1):
            reader.lookup_rows(e, *_all_rows())
    fetched = [path for path, _, _ in requests]
    assert any("/c/1/" in p for p in fetched)
    assert not [p for p in fetched if "/c/2/" in p or "/c/3/" in p or p.endswith(("/c/2/0", "/c/3/0"))], fetched


def test_interrupted_pack_looks_incomplete_and_resumes_keeping_its_files(cache, tmp_path, monkeypatch):
    from storage import pack as pack_module

    out = tmp_path / "cache.zarr"
    real_put, puts = pack_module._Files.put, []

    def dying_put(self, key, data):  # killed after the 8th file, before the journal notes it
        if key == pack_module.JOURNAL:
            if len(puts) == 7:
                raise KeyboardInterrupt("killed mid-pack")
            puts.append(key)
        real_put(self, key, data)

    monkeypatch.setattr(pack_module._Files, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        pack(str(cache), str(out), log=None)
    monkeypatch.setattr(pack_module._Files, "put", real_put)
    assert not (out / "pack.json").exists()
    with pytest.raises(RuntimeError, match="pack.json: absent, so this packed copy is incomplete"):
        open_cache(out)
    journal = json.loads((out / pack_module.JOURNAL).read_text())
    assert len(journal) == 7
    kept = {key: (out / key).stat().st_mtime_ns for key in journal}
    # a noted file damaged since is written again
    damaged = sorted(journal)[0]
    _flip(out / damaged, 0)
    lines: list = []
    pack(str(cache), str(out), log=lines.append)
    assert "18 files written, 6 kept" in lines[-1], lines[-1]
    for key, mtime in kept.items():
        assert ((out / key).stat().st_mtime_ns == mtime) == (key != damaged), key
    assert not (out / pack_module.JOURNAL).exists()
    _assert_same_cache(open_cache(cache), open_cache(out))


def test_pack_refuses_a_destination_holding_another_pack(cache, packed, tmp_path):
    import shutil

    copy = tmp_path / "cache.zarr"
    shutil.copytree(packed, copy)
    with pytest.raises(CacheMismatchError, match="field kdcache_packed.epochs"):
        pack(str(cache), str(copy), epochs="0-1", log=None)


# ----------------------------------------------------------------------------- students
@pytest.fixture(scope="module")
def fmnist_packed(fmnist_shards, tmp_path_factory) -> tuple[Path, Path]:
    """A 4-epoch x 1-view tiny-teacher cache of the Fashion-MNIST split, and its packed copy."""
    from test_student_data import build_cache

    root = tmp_path_factory.mktemp("fmnist_pack")
    build_cache(fmnist_shards, root / "cache.zarr", epochs=4)
    pack(str(root / "cache.zarr"), str(root / "packed" / "cache.zarr"), log=None)
    return root / "cache.zarr", root / "packed" / "cache.zarr"


def _train(fmnist_shards, cache, run_dir, *overrides):
    from student.train import train
    from test_student_data import student_config

    # two student epochs of 1 view read cache epochs 0 and 1 of the 4
    return train(student_config(fmnist_shards, cache, run_dir, "run.epochs=2", *overrides))


def _same_training(a: dict, b: dict) -> None:
    timing = ("time", "per_s", "seconds", "wait")
    keys = [k for k in a if not any(t in k for t in timing)]
    assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_student_trains_from_packed_http_identically_and_fetches_only_its_epochs(fmnist_shards, fmnist_packed,
                                                                               tmp_path):
    unpacked, packed_copy = fmnist_packed
    base_metrics = _train(fmnist_shards, unpacked, tmp_path / "unpacked")
    requests: list = []
    with http_server(packed_copy.parent, requests) as base:
        metrics = _train(fmnist_shards, f"{base}/cache.zarr", tmp_path / "http", "cache.wait=true")
    _same_training(base_metrics, metrics)
    fetched = [p for p, _, _ in requests]
    assert any("/prob/c/1/" in p for p in fetched)
    assert not [p for p in fetched if "/c/2/" in p or "/c/3/" in p or p.endswith(("/c/2/0", "/c/3/0"))], fetched


def test_student_trains_from_packed_s3_identically(fmnist_shards, fmnist_packed, s3_endpoint, tmp_path):
    import s3fs

    unpacked, packed_copy = fmnist_packed
    bucket = new_bucket("kdcache-student-pack")
    s3fs.S3FileSystem().put(str(packed_copy), f"{bucket.removeprefix('s3://')}/cache.zarr", recursive=True)
    assert verify(f"{bucket}/cache.zarr")["epochs"] == [0, 1, 2, 3]  # the upload is whole
    _same_training(_train(fmnist_shards, unpacked, tmp_path / "unpacked"),
                   _train(fmnist_shards, f"{bucket}/cache.zarr", tmp_path / "s3"))


def test_flipped_byte_stops_the_student_naming_file_epoch_shard(fmnist_shards, fmnist_packed, tmp_path):
    import shutil

    copy = tmp_path / "served" / "cache.zarr"
    shutil.copytree(fmnist_packed[1], copy)
    target = copy / "index" / "c" / "1" / "0" / "0" / "0"
    data = target.read_bytes()
    index = np.frombuffer(data[-(16 * 4 + 4):-4], "<u8").reshape(-1, 2)
    _flip(target, int(index[3, 0] + index[3, 1] // 2))
    with http_server(copy.parent) as base:
        with pytest.raises(CacheCorruptError, match=r"file index/c/1/0/0/0, epoch 1, shard 3"):
            _train(fmnist_shards, f"{base}/cache.zarr", tmp_path / "run")


def test_student_asking_for_epochs_the_copy_lacks_is_refused(fmnist_shards, fmnist_packed, tmp_path):
    unpacked, _ = fmnist_packed
    sub = tmp_path / "sub.zarr"
    pack(str(unpacked), str(sub), epochs="0", log=None)
    with pytest.raises(EpochNotInCache, match="epoch 1 is not in this packed copy, which holds epochs 0 of 4"):
        _train(fmnist_shards, sub, tmp_path / "run")


def test_a_protocol_without_its_package_is_a_clear_error(monkeypatch):
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is a mapping)
    # what a machine without huggingface_hub sees (fsspec imports HfFileSystem on first use)
    monkeypatch.setitem(registry.known_implementations, "hf",
                        {"class": "kdcache_absent_module.HfFileSystem", "err": "Install huggingface_hub to access HfFileSystem"})
    monkeypatch.delitem(registry._registry, "hf", raising=False)
    with pytest.raises(ImportError, match=r"cache hf://datasets/org/cache: reading hf:// needs huggingface_hub "
                                          r"\(pip install huggingface_hub\)"):
        open_cache("hf://datasets/org/cache")


def test_done_items_is_one_listing_without_reading_each_marker(cache, monkeypatch):
    """A resume finds the done items from the listing alone: reading each marker back cost one GET
    per item (34 s per 1282 markers on moto, bench/scale.py)."""
    from storage import CacheReader

    reader = open_cache(cache)
    monkeypatch.setattr(CacheReader, "_done_record", lambda *a: pytest.fail("read a done marker"))
    assert reader.done_items() == {(e, s) for e in range(EPOCHS) for s in range(len(SHARDS))}


def test_card_reports_the_audit_given(cache, tmp_path):
    report = {"0": {"rows": 64, "top1_agree": 1.0, "max_abs_dp": 0.0012, "max_abs_dlogprob": 0.01, "invalid": 0,
                    "fidelity": {"tau": [1.0], "tv": [0.01], "kl": [0.001]}}}
    (tmp_path / "audit.json").write_text(json.dumps(report))
    pack(str(cache), str(tmp_path / "out.zarr"), epochs="0", audit=str(tmp_path / "audit.json"), log=None)
    card = (tmp_path / "out.zarr" / "README.md").read_text()
    assert "| 0 | 64 | 100.00 % | 1.20e-03 | 0 |" in card and "holds epochs 0 (" in card
    assert "run.epochs=2" in card  # 1 epoch x 2 views


def test_a_packed_copy_repacks_to_a_subset_of_its_epochs(cache, packed, tmp_path):
    """A local download of some epochs of a published copy: the same files, checked against its pack.json."""
    manifest = pack(str(packed), str(tmp_path / "sub.zarr"), epochs="1-2", log=None)
    assert manifest["files"]["prob/c/1/0/0/0"] == json.loads((packed / "pack.json").read_text())["files"]["prob/c/1/0/0/0"]
    _assert_same_cache(open_cache(cache), open_cache(tmp_path / "sub.zarr"), epochs=[1, 2])
