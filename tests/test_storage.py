"""Cache format: round trip, done markers, resume, mismatches, readiness, concurrency, fsspec, learned tail."""
from __future__ import annotations

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest

from storage import CacheMismatchError, CacheNotReady, create_cache, open_cache
from storage import encoding

SHARDS = [(0, 8), (8, 8), (16, 5)]  # last shard short
N, EPOCHS, VIEWS, K, C = 21, 2, 2, 4, 1000
ATTRS = {"teacher": "regnety_160", "fingerprint": "f" * 64, "manifest_sha256": "m" * 64, "seed": 0, "k": K}


def _create(path, **changes):
    kw = dict(shards=SHARDS, epochs=EPOCHS, views=VIEWS, k=K, num_classes=C, attrs=ATTRS)
    kw.update(changes)
    return create_cache(path, **kw)


def _item(epoch, shard, seed=0, shards=SHARDS):
    """All rows of one item with realistic sorted log-probs and distinct indices."""
    first, count = shards[shard]
    rng = np.random.default_rng([seed, epoch, shard])
    ids = np.repeat(np.arange(first, first + count), VIEWS)
    views = np.tile(np.arange(VIEWS), count)
    logits = rng.normal(size=(len(ids), C)) * 3
    top = np.argsort(-logits, axis=1)[:, :K]
    lse = np.log(np.exp(logits).sum(1))
    lp = np.take_along_axis(logits, top, 1) - lse[:, None]
    return ids, views, lp.astype(np.float32), top


def _assert_same_topk(got_lp, got_idx, lp, idx):
    """Same top-k classes, exact top-1, each class's probability within the grid bound,
    descending values, and exact rank order wherever the dequantized value is unique in its row
    (the order of classes sharing one grid cell is not stored: storage/encoding.py)."""
    np.testing.assert_array_equal(np.sort(got_idx, 1), np.sort(idx, 1))
    np.testing.assert_array_equal(got_idx[:, 0], idx[:, 0])
    assert (np.diff(got_lp, axis=1) <= 0).all()
    order = np.argsort(got_idx, 1), np.argsort(idx, 1)
    p_got = np.exp(np.take_along_axis(got_lp, order[0], 1).astype(np.float64))
    p_exact = np.exp(np.take_along_axis(lp, order[1], 1).astype(np.float64))
    assert np.abs(p_got - p_exact).max() <= encoding.max_abs_dp() + 1e-6
    unique = (got_lp[:, :, None] == got_lp[:, None, :]).sum(2) == 1
    np.testing.assert_array_equal(got_idx[unique], idx[unique])


def _write_all(path):
    w = _create(path)
    for e in range(EPOCHS):
        for s in range(len(SHARDS)):
            w.write_item(e, s, *_item(e, s))
    return w


def test_round_trip_within_quantization(tmp_path):
    _write_all(tmp_path / "c.zarr")
    r = open_cache(tmp_path / "c.zarr")
    assert (r.epochs, r.views, r.k, r.num_classes) == (EPOCHS, VIEWS, K, C)
    for e in range(EPOCHS):
        for s in range(len(SHARDS)):
            ids, views, lp, idx = _item(e, s)
            order = np.random.default_rng(1).permutation(len(ids))
            got_lp, got_idx, valid = r.lookup_rows(e, ids[order], views[order])[:3]
            assert got_lp.dtype == np.float32 and got_idx.dtype == np.int64 and valid.all()
            _assert_same_topk(got_lp, got_idx, lp[order], idx[order])
    assert r.bytes_on_disk() > r.bytes_on_disk(metadata=False) > 0
    assert r.attrs["teacher"] == "regnety_160" and r.attrs["format_version"] == 4


def test_done_marker_written_after_data(tmp_path, monkeypatch):
    w = _create(tmp_path / "c.zarr")
    order = []
    for name in ("_prob", "_index", "_tail_mass", "_valid", "_done"):
        arr = getattr(w, name)
        real = arr.__setitem__

        class Spy:
            def __getattr__(self, a, arr=arr):
                return getattr(arr, a)

            def __getitem__(self, key, arr=arr):
                return arr[key]

            def __setitem__(self, key, value, name=name, real=real):
                order.append(name)
                real(key, value)

        setattr(w, name, Spy())
    w.write_item(0, 1, *_item(0, 1))
    assert order[-1] == "_done" and set(order[:-1]) == {"_prob", "_index", "_tail_mass", "_valid"}
    assert w.is_done(0, 1) and not w.is_done(0, 0) and w.done_items() == {(0, 1)}


def test_resume_reopens_and_mismatch_names_field(tmp_path):
    path = tmp_path / "c.zarr"
    w = _create(path)
    w.write_item(1, 0, *_item(1, 0))
    again = _create(path)  # identical attrs: resume
    assert again.done_items() == {(1, 0)}
    for changes, field in [({"k": 5}, "k"),
                           ({"attrs": {**ATTRS, "teacher": "deit"}}, "teacher"),
                           ({"attrs": {**ATTRS, "fingerprint": "0" * 64}}, "fingerprint"),
                           ({"attrs": {**ATTRS, "manifest_sha256": "x"}}, "manifest_sha256"),
                           ({"epochs": 3}, "epochs")]:
        with pytest.raises(CacheMismatchError, match=rf"field {field}: expected"):
            _create(path, **changes)
    for expect, field in [({"k": 10}, "k"), ({"teacher": "deit"}, "teacher"),
                          ({"fingerprint": "0"}, "fingerprint"), ({"manifest_sha256": "x"}, "manifest_sha256")]:
        with pytest.raises(CacheMismatchError, match=rf"field {field}: expected .*, found "):
            open_cache(path, expect=expect)
    assert open_cache(path, expect={"k": K, "teacher": "regnety_160", "num_classes": C}).k == K


def test_not_ready_names_epoch_and_shard(tmp_path):
    w = _create(tmp_path / "c.zarr")
    w.write_item(0, 0, *_item(0, 0))
    r = open_cache(tmp_path / "c.zarr")
    r.lookup_rows(0, np.array([0, 7]), np.array([0, 1]))
    with pytest.raises(CacheNotReady, match="epoch 0 shard 1") as info:
        r.lookup_rows(0, np.array([3, 9]), np.array([0, 0]))
    assert (info.value.epoch, info.value.shard) == (0, 1)
    with pytest.raises(CacheNotReady, match="epoch 1 shard 0"):
        r.lookup_rows(1, np.array([0]), np.array([0]))


def test_wait_done_returns_when_marked_by_another_thread(tmp_path):
    w = _create(tmp_path / "c.zarr")
    r = open_cache(tmp_path / "c.zarr")
    messages = []
    t = threading.Timer(0.3, lambda: w.write_item(1, 2, *_item(1, 2)))
    t.start()
    start = time.monotonic()
    r.wait_done(1, 2, timeout=10, poll=0.05, log=messages.append)
    t.join()
    assert time.monotonic() - start < 5
    assert messages and "epoch 1 shard 2" in messages[0]
    assert r.lookup_rows(1, np.array([20]), np.array([1])).valid.all()
    with pytest.raises(TimeoutError, match="epoch 0 shard 0"):
        r.wait_done(0, 0, timeout=0.1, poll=0.05, log=None)


def test_missing_rows_recorded_and_invalid(tmp_path):
    w = _create(tmp_path / "c.zarr")
    ids, views, lp, idx = _item(0, 1)
    keep = ~((ids == 10) | ((ids == 12) & (views == 1)))
    missing = [{"shard": "train-000001.tar", "key": "k10", "epoch": 0, "view": v, "reason": "corrupt"}
               for v in range(VIEWS)] + [{"shard": "train-000001.tar", "key": "k12", "epoch": 0, "view": 1,
                                          "reason": "partner corrupt"}]
    w.write_item(0, 1, ids[keep], views[keep], lp[keep], idx[keep], missing=missing)
    r = open_cache(tmp_path / "c.zarr")
    got_lp, got_idx, valid = r.lookup_rows(0, ids, views)[:3]
    np.testing.assert_array_equal(valid, keep)
    _assert_same_topk(got_lp[keep], got_idx[keep], lp[keep], idx[keep])
    assert r.missing_records() == missing


def test_write_item_rejects_bad_rows(tmp_path):
    w = _create(tmp_path / "c.zarr")
    ids, views, lp, idx = _item(0, 0)
    with pytest.raises(ValueError, match="epoch 0 shard 0: sample_id 8"):
        w.write_item(0, 0, ids + 1, views, lp, idx)
    bad = lp.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        w.write_item(0, 0, ids, views, bad, idx)
    assert not w.is_done(0, 0)


def _proc_write(path, epoch, shard, start_evt, shards=SHARDS):
    w = _create(path, shards=shards)
    start_evt.wait()
    w.write_item(epoch, shard, *_item(epoch, shard, shards=shards))


def _write_at_once(path, items, shards=SHARDS) -> None:
    """Write ``items`` from one process each, released together."""
    ctx = mp.get_context("spawn")
    evt = ctx.Event()
    procs = [ctx.Process(target=_proc_write, args=(str(path), e, s, evt, shards)) for e, s in items]
    for p in procs:
        p.start()
    evt.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def test_concurrent_items_from_two_processes_equal_sequential(tmp_path):
    par, seq = tmp_path / "par.zarr", tmp_path / "seq.zarr"
    _create(par)
    items = [(0, 0), (0, 1)]  # adjacent items: neighbouring chunks of the same arrays
    _write_at_once(par, items)
    w = _create(seq)
    for e, s in items:
        w.write_item(e, s, *_item(e, s))
    a, b = open_cache(par), open_cache(seq)
    assert a.done_items() == b.done_items() == set(items)
    ids = np.repeat(np.arange(16), VIEWS)
    views = np.tile(np.arange(VIEWS), 16)
    for x, y in zip(a.lookup_rows(0, ids, views)[:3], b.lookup_rows(0, ids, views)[:3]):
        np.testing.assert_array_equal(x, y)
    for name in ("prob", "index", "tail_mass", "valid"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])


VARIABLE_SHARDS = [(0, 5), (5, 9), (14, 2), (16, 7)]  # shards written by another tool: any sizes


def test_variable_shard_counts_one_chunk_per_item_and_concurrent_writers(tmp_path):
    """With shards of different sizes every item still owns exactly one chunk per array (its
    slot of the largest count): two processes writing adjacent items lose nothing, each item's
    rows come back by sample id, and the padding rows of a slot are never valid."""
    par, seq = tmp_path / "par.zarr", tmp_path / "seq.zarr"
    w = _create(par, shards=VARIABLE_SHARDS)
    assert w.slot == 9 and w.num_samples == 23
    _write_at_once(par, [(1, 1), (1, 2), (1, 3)], VARIABLE_SHARDS)  # adjacent slots, written at once
    w.write_item(1, 0, *_item(1, 0, shards=VARIABLE_SHARDS))
    ws = _create(seq, shards=VARIABLE_SHARDS)
    for s in range(len(VARIABLE_SHARDS)):
        ws.write_item(1, s, *_item(1, s, shards=VARIABLE_SHARDS))
    for name in ("prob", "index", "tail_mass", "valid"):
        np.testing.assert_array_equal(w.group[name][:], ws.group[name][:])
        chunks = sorted(p.relative_to(par / name / "c").as_posix() for p in (par / name / "c").rglob("*")
                        if p.is_file())
        assert chunks == [f"1/{s}/0" + "/0" * (name in ("prob", "index")) for s in range(4)], (name, chunks)
    r = open_cache(par)
    ids = np.concatenate([_item(1, s, shards=VARIABLE_SHARDS)[0] for s in range(4)])
    views = np.concatenate([_item(1, s, shards=VARIABLE_SHARDS)[1] for s in range(4)])
    order = np.random.default_rng(0).permutation(len(ids))
    lp, idx, valid = r.lookup_rows(1, ids[order], views[order])[:3]
    assert valid.all() and len(ids) == 23 * VIEWS
    _assert_same_topk(lp, idx, *[np.concatenate([_item(1, s, shards=VARIABLE_SHARDS)[i] for s in range(4)])[order]
                                 for i in (2, 3)])
    assert int(r.group["valid"][1].sum()) == 23 * VIEWS  # 4 slots x 9 rows, 13 of them padding
    with pytest.raises(ValueError, match="shard 2: first_id 15"):
        _create(tmp_path / "bad.zarr", shards=[(0, 5), (5, 9), (15, 2)])


def test_fsspec_memory_store():
    path = f"memory://kdcache-test-{time.monotonic_ns()}/cache"
    w = _create(path)
    w.write_item(1, 2, *_item(1, 2))
    r = open_cache(path, expect={"k": K})
    ids, views, lp, idx = _item(1, 2)
    got_lp, got_idx, valid = r.lookup_rows(1, ids, views)[:3]
    _assert_same_topk(got_lp, got_idx, lp, idx)
    assert valid.all() and r.done_items() == {(1, 2)} and r.bytes_on_disk() > 0


def test_file_url(tmp_path):
    _write_all(f"file://{tmp_path}/c.zarr")
    assert open_cache(tmp_path / "c.zarr").done_items() == {(e, s) for e in range(EPOCHS) for s in range(3)}


@pytest.mark.parametrize("k", [1, 2, 10, 100])
def test_encoding_round_trip_and_bounded(k):
    """Per class |dp| <= half a grid step (1.5 steps only for a runner-up tied with the top-1),
    relative error <= half a log step below 1/8, exact index set and top-1, ties in ascending
    class id; near-50/50 mixup rows keep their top-1; probabilities down to e^-60 keep their size."""
    rng = np.random.default_rng(k)
    logits = rng.normal(size=(500, C)) * rng.uniform(1, 12, (500, 1))
    logits[:100, 7], logits[:100, 3] = 80.0, 80.0 - 1e-4  # near-ties at the top (mixup lam ~ 0.5)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    lp = (np.take_along_axis(logits, top, 1) - np.log(np.exp(logits).sum(1))[:, None]).astype(np.float32)
    if k == 100:  # deep entries: format 2 coded everything below 1/510 as 0
        assert lp.min() < np.log(1e-8)
    codes, idx = encoding.decode_rows(*encoding.encode_rows(lp, top, C))
    got_lp = encoding.logprob_table()[codes]
    _assert_same_topk(got_lp, idx.astype(np.int64), lp, top)
    half_step = encoding.max_abs_dp() / 3
    p_err = np.abs(np.exp(got_lp.astype(np.float64)) - np.exp(lp.astype(np.float64)))
    assert p_err[:, 0].max() <= half_step + 1e-6
    small = (lp[:, 1:] < np.log(encoding.LINEAR_FROM)) & (lp[:, 1:] > encoding.LOG_MIN)
    rel = np.abs(got_lp[:, 1:] - lp[:, 1:])[small]
    if k > 1:
        p0, p1 = np.exp(lp[:, 0].astype(np.float64)), np.exp(lp[:, 1].astype(np.float64))
        tie_free = encoding.encode_probs(np.log(p0)) != encoding.encode_probs(np.log(p1))
        assert p_err[tie_free, 1:].max() <= half_step + 1e-6
        assert (idx[:100, 0] == 7).all()
        tie_free_small = small & tie_free[:, None]
        assert np.abs(got_lp[:, 1:] - lp[:, 1:])[tie_free_small].max() <= encoding.COARSE_STEP / 2 + 1e-5
        fine = tie_free_small & (lp[:, 1:] > np.log(encoding.FINE_TO))
        assert np.abs(got_lp[:, 1:] - lp[:, 1:])[fine].max() <= encoding.FINE_STEP / 2 + 1e-5
        assert rel.size > 0
    with pytest.raises(ValueError, match="repeated class index"):
        encoding.encode_rows(np.log(np.full((1, 2), 0.4)), np.array([[5, 5]]), C)


def test_tail_mass_stored_not_derived(tmp_path):
    """A confident row whose dequantized top-k sums to >= 1 keeps its (tiny) tail mass."""
    w = _create(tmp_path / "c.zarr")
    ids, views, lp, idx = _item(0, 0)
    logits = np.full((len(ids), C), -30.0)
    logits[:, 0], logits[:, 1:K] = 12.0, 0.0
    logits[:, K:] += np.random.default_rng(0).normal(size=(len(ids), C - K))
    idx = np.tile(np.arange(K), (len(ids), 1))
    full = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    w.write_item(0, 0, ids, views, full[:, :K].astype(np.float32), idx, logits=logits.astype(np.float32))
    rows = open_cache(tmp_path / "c.zarr").lookup_rows(0, ids, views)
    true_tail = np.log(np.exp(full[:, K:]).sum(1))
    assert np.exp(rows.logprobs.astype(np.float64)).sum(1).min() >= 1.0 - 1e-3
    np.testing.assert_allclose(rows.log_tail, true_tail, atol=encoding.COARSE_STEP / 2 + 1e-5)
    assert rows.tail_code is None


def test_old_format_refused_naming_the_field(tmp_path):
    path = tmp_path / "c.zarr"
    _create(path)
    import zarr

    group = zarr.open_group(str(path), mode="a")
    group.attrs.update({"format_version": 3})  # format 3: rows at sample_id, no slots
    with pytest.raises(CacheMismatchError, match=r"field format_version: expected 4, found 3 \(a cache written by "
                                                 r"another kdcache version; re-create it"):
        open_cache(path)
    with pytest.raises(CacheMismatchError, match=r"field format_version: expected 4 \(this run\), found 3 \(in the cache\)"):
        _create(path)


def _logit_item(epoch, shard, seed=0):
    """All rows of one item as full logits (for a learned-tail cache) + their top-K."""
    first, count = SHARDS[shard]
    rng = np.random.default_rng([seed, epoch, shard, 1])
    ids = np.repeat(np.arange(first, first + count), VIEWS)
    views = np.tile(np.arange(VIEWS), count)
    logits = (rng.normal(size=(len(ids), 8)) @ rng.normal(size=(8, C)) + rng.normal(size=(len(ids), C))).astype(np.float32)
    top = np.argsort(-logits, axis=1)[:, :K]
    lse = np.log(np.exp(logits.astype(np.float64)).sum(1))
    return ids, views, (np.take_along_axis(logits, top, 1) - lse[:, None]).astype(np.float32), top, logits


def test_learned_tail_round_trips_and_is_reused_on_resume(tmp_path):
    from storage.tail import TailModel
    from teacher.fidelity import item_record

    path = tmp_path / "c.zarr"
    w = _create(path, tail_dim=16)
    ids, views, lp, idx, logits = _logit_item(0, 1)
    with pytest.raises(RuntimeError, match="field tail_basis: the tail basis is not written yet"):
        w.write_item(0, 1, ids, views, lp, idx, logits=logits)
    tail = TailModel.fit(np.concatenate([_logit_item(1, s, seed=9)[4] for s in range(3)]), dim=16, step=1.0)
    w.write_tail(tail)
    with pytest.raises(ValueError, match="field logits"):
        w.write_item(0, 1, ids, views, lp, idx)
    w.write_item(0, 1, ids, views, lp, idx, logits=logits, fidelity=item_record(w, logits))

    again = _create(path, tail_dim=16)  # resume: the stored basis, bit for bit
    with pytest.raises(CacheMismatchError, match="field tail_basis: already written"):
        again.write_tail(tail)
    stored = again.tail_model()
    for name in ("mean", "basis", "step"):
        np.testing.assert_array_equal(getattr(stored, name), getattr(tail, name))
    again.write_item(0, 2, *_logit_item(0, 2)[:4], logits=_logit_item(0, 2)[4],
                     fidelity=item_record(again, _logit_item(0, 2)[4]))

    r = open_cache(path)
    rows = r.lookup_rows(0, ids, views)
    import torch

    np.testing.assert_array_equal(rows.tail_code, tail.encode(torch.from_numpy(logits)).numpy())
    assert rows.tail_code.dtype == np.int8 and np.abs(rows.tail_code).max() > 0
    fid = r.fidelity()
    assert fid["rows"] == len(ids) + 2 * SHARDS[2][1] and K in fid["ks"] and fid["taus"] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(CacheMismatchError, match=r"field tail_dim: expected 8 \(this run\), found 16 \(in the cache\)"):
        _create(path, tail_dim=8)


@pytest.mark.parametrize("fidelity_rows", [5, 256])  # the record's rows reached mid-item / never
def test_rows_encoded_while_scoring_store_what_write_item_encodes(tmp_path, monkeypatch, fidelity_rows):
    """teacher.work.RowEncoder encodes batch by batch on a thread while the teacher scores; the
    stored bytes (every row array and the done record with its fidelity) are those of write_item
    encoding the whole item itself."""
    import zarr

    import teacher.fidelity
    from teacher.fidelity import item_record
    from teacher.work import RowEncoder
    from storage.cache import ROW_ARRAYS
    from storage.tail import TailModel

    monkeypatch.setattr(teacher.fidelity, "FIDELITY_ROWS", fidelity_rows)
    tail = TailModel.fit(np.concatenate([_logit_item(1, s, seed=9)[4] for s in range(3)]), dim=16, step=1.0)
    writers = {}
    for way in ("whole", "batches"):
        writers[way] = _create(tmp_path / f"{way}.zarr", tail_dim=16)
        writers[way].write_tail(tail)
    for shard in range(len(SHARDS)):
        ids, views, lp, idx, logits = _logit_item(0, shard)
        writers["whole"].write_item(0, shard, ids, views, lp, idx, logits=logits,
                                    fidelity=item_record(writers["whole"], logits))
        encoder = RowEncoder(writers["batches"])
        try:
            for lo in range(0, len(ids), 3):  # teacher batches of 3 rows
                encoder.add(lp[lo:lo + 3], idx[lo:lo + 3], logits[lo:lo + 3])
            writers["batches"].write_item(0, shard, ids, views, lp, idx, logits=logits, encoded=encoder.result)
        finally:
            encoder.close()
    whole, batches = (zarr.open_group(str(tmp_path / f"{way}.zarr"), mode="r") for way in ("whole", "batches"))
    for name in ROW_ARRAYS:
        np.testing.assert_array_equal(batches[name][:], whole[name][:], err_msg=name)
    assert open_cache(tmp_path / "batches.zarr").fidelity()["rows"] == min(fidelity_rows, SHARDS[0][1] * VIEWS) \
        + min(fidelity_rows, SHARDS[1][1] * VIEWS) + min(fidelity_rows, SHARDS[2][1] * VIEWS)
