"""Student data: the cache guard, the plan taken from the cache, the (epoch, sample_id, view)
join, epoch cycling, invalid rows, and replay at another resolution.

Tiny caches are built here without Ray by calling ``teacher.work.run_item`` per item with a
1-block ViT teacher (random init: its targets are arbitrary but deterministic).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from teacher.job import CacheJobConfig, cache_attrs, make_teacher, open_writer
from pipeline.config import load_config
from pipeline.plan import AugConfig
from pipeline.manifest import load_manifest
from teacher.work import run_item
from teacher.model import TeacherConfig, create_model
from storage import CacheMismatchError, CacheNotReady
from student.config import TrainConfig
from student.data import TrainData, open_checked_cache

NUM_CLASSES = 10
TINY_TEACHER = {
    "name": "vit_tiny_patch16_224", "num_classes": NUM_CLASSES, "input_size": 28, "channels_last": False,
    "model_kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 1, "num_heads": 2},
}
# DeiT augmentation, Mixup/CutMix on, at Fashion-MNIST size.
AUG = {"scale": [0.35, 1.0]}
TINY_STUDENT = {"name": "deit_tiny_distilled_patch16_224", "drop_path_rate": 0.0,
                "model_kwargs": {"patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def build_cache(shards_root: Path, out: Path, *, epochs: int = 2, views: int = 1, k: int = 3, seed: int = 7,
                aug: dict | None = None, items=None, teacher_state: dict | None = None) -> CacheJobConfig:
    """Cache ``items`` (default all) of the train split with the tiny teacher; returns the job config.

    The teacher's weights (``teacher_state``, default a seeded random init) go to a file next to
    the cache, so an online teacher built from the cache's job config is the very same network.
    """
    weights = out.parent / f"{out.name}.teacher.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    if teacher_state is None:
        torch.manual_seed(0)
        teacher_state = create_model(TeacherConfig.from_dict(TINY_TEACHER)).state_dict()
    torch.save(teacher_state, weights)
    cfg = CacheJobConfig.from_dict({
        "shards": str(shards_root / "train"), "out": str(out), "epochs": epochs, "views": views, "k": k,
        "seed": seed, "batch_size": 64, "num_workers": 0, "aug": aug if aug is not None else AUG,
        "teacher": {**TINY_TEACHER, "checkpoint": str(weights)},
    })
    manifest = load_manifest(cfg.shards)
    teacher = make_teacher(cfg)
    writer = open_writer(cfg, manifest, cache_attrs(cfg, manifest))
    todo = items if items is not None else [(e, s) for e in range(epochs) for s in range(len(manifest.shards))]
    for e, s in todo:
        run_item(cfg, e, s, teacher=teacher, writer=writer, manifest=manifest)
    return cfg


def student_config(shards_root: Path, cache: Path | None, run_dir: Path, *overrides: str) -> TrainConfig:
    """A tiny CPU fp32 student config on the fixture shards (override anything with dotted keys)."""
    base = [
        f"data.train={shards_root / 'train'}", f"data.val={shards_root / 'val'}", "data.img_size=28",
        "data.batch_size=16", "data.num_workers=0", "data.eval_batch_size=64",
        f"model.name={TINY_STUDENT['name']}", "model.drop_path_rate=0.0",
        "model.model_kwargs={patch_size: 7, embed_dim: 32, depth: 2, num_heads: 2}",
        "loss.mode=hard", "optim.warmup_epochs=0", "optim.lr=1.0e-3", "optim.min_lr=1.0e-4",
        "run.device=cpu", "run.threads=1", "run.amp=none", "run.progress=false", "run.plot=false", "run.log_every=1",
        f"run.out={run_dir}", "run.epochs=1",
    ]
    if cache is not None:
        base.append(f"cache.path={cache}")
    return load_config(TrainConfig, None, base + list(overrides))


@pytest.fixture(scope="session")
def tiny_cache(fmnist_shards, tmp_path_factory) -> Path:
    """2 epochs x 1 view, k=3, of the 256-sample Fashion-MNIST train split (4 shards of 64)."""
    out = tmp_path_factory.mktemp("cache") / "tiny.zarr"
    build_cache(fmnist_shards, out)
    return out


def _data(cfg: TrainConfig, log=print) -> TrainData:
    manifest = load_manifest(cfg.data.train)
    reader, plan = open_checked_cache(cfg, manifest)
    return TrainData(cfg, manifest, plan, reader, log=log)


def test_plan_defaults_to_cache_attrs(fmnist_shards, tiny_cache, tmp_path):
    cfg = student_config(fmnist_shards, tiny_cache, tmp_path)
    data = _data(cfg)
    assert data.plan.seed == 7 and data.plan.views == 1 and data.plan.k == 3 and data.plan.cached_epochs == 2
    assert data.plan.aug == AugConfig.from_dict(AUG)
    # The student's own (equal) aug config is accepted: it fingerprints the same.
    cfg2 = student_config(fmnist_shards, tiny_cache, tmp_path, "data.aug={scale: [0.35, 1.0]}", "data.seed=7")
    assert _data(cfg2).plan.fingerprint == data.plan.fingerprint


@pytest.mark.parametrize("override, field", [
    ("data.aug={scale: [0.5, 1.0]}", "fingerprint"),
    ("teacher.k=5", "k"),
    ("data.seed=8", "seed"),
])
def test_cache_guard_refuses_mismatch(fmnist_shards, tiny_cache, tmp_path, override, field):
    cfg = student_config(fmnist_shards, tiny_cache, tmp_path, override)
    with pytest.raises(CacheMismatchError, match=f"field {field}"):
        _data(cfg)


def test_views_other_than_the_caches_are_refused_with_a_hint(fmnist_shards, tiny_cache, tmp_path):
    cfg = student_config(fmnist_shards, tiny_cache, tmp_path, "data.views=3")
    with pytest.raises(CacheMismatchError, match="field views.*holds 1 views.*one_view"):
        _data(cfg)


@pytest.fixture(scope="module")
def two_view_cache(fmnist_shards, tmp_path_factory) -> Path:
    """1 epoch x 2 views, k=3."""
    out = tmp_path_factory.mktemp("cache2") / "two_view.zarr"
    build_cache(fmnist_shards, out, epochs=1, views=2)
    return out


@pytest.mark.parametrize("sampler", ["ra", "one_view"])
def test_student_epochs_read_each_cached_row_once(fmnist_shards, two_view_cache, tmp_path, sampler):
    """2 views: student epochs 0 and 1 each read 256 rows, together all 512 rows of cache epoch 0,
    each joined with its own cached row; epoch 2 reads them again."""
    from storage import open_cache

    data = _data(student_config(fmnist_shards, two_view_cache, tmp_path, f"data.sampler={sampler}"))
    reader = open_cache(str(two_view_cache))
    seen = []
    for epoch in (0, 1):
        rows = []
        for b in data.batches(epoch):
            lp, idx, valid = reader.lookup_rows(0, b["sample_id"].numpy(), b["view"].numpy())[:3]
            np.testing.assert_array_equal(b["teacher_indices"].numpy(), idx)
            rows += list(zip(b["sample_id"].tolist(), b["view"].tolist()))
        assert len(rows) == 256 and (sampler == "ra" or {v for _, v in rows} == {epoch})
        seen += rows
    assert sorted(seen) == [(i, v) for i in range(256) for v in (0, 1)]
    again = [(s, v) for b in data.batches(2) for s, v in zip(b["sample_id"].tolist(), b["view"].tolist())]
    assert data.plan_epoch(2) == 0 and len(again) == 256 and set(again) <= set(seen)


def test_cache_guard_refuses_other_manifest(fmnist_shards, tiny_cache, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fmnist_shards / "train", other / "train")
    manifest = other / "train" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"source"', '"source_note": "edited", "source"', 1))
    cfg = student_config(other, tiny_cache, tmp_path)
    with pytest.raises(CacheMismatchError, match="field manifest_sha256"):
        _data(cfg)


def test_join_matches_cache_rows(fmnist_shards, tiny_cache, tmp_path):
    from storage import open_cache

    cfg = student_config(fmnist_shards, tiny_cache, tmp_path)
    data = _data(cfg)
    reader = open_cache(str(tiny_cache))
    batches = list(data.batches(1))
    assert len(batches) == data.num_batches() == 256 // 16
    ids = torch.cat([b["sample_id"] for b in batches])
    assert sorted(ids.tolist()) == list(range(256))
    b = batches[3]
    lp, idx, valid = reader.lookup_rows(1, b["sample_id"].numpy(), b["view"].numpy())[:3]
    assert valid.all()
    np.testing.assert_array_equal(b["teacher_indices"].numpy(), idx)
    np.testing.assert_array_equal(b["teacher_logprobs"].numpy(), lp)
    assert (b["epoch"] == 1).all() and b["dropped"] == 0


def test_epochs_cycle_through_cache_logged_once(fmnist_shards, tiny_cache, tmp_path):
    cfg = student_config(fmnist_shards, tiny_cache, tmp_path, "data.max_batches=2")
    notes = []
    data = _data(cfg, log=notes.append)
    assert [data.plan_epoch(e) for e in range(5)] == [0, 1, 0, 1, 0]
    first = next(iter(data.batches(3)))
    assert (first["epoch"] == 1).all()   # training epoch 3 replays cached epoch 1
    assert len([n for n in notes if "read again" in n]) == 1


def test_other_resolution_replays_same_rows(fmnist_shards, tiny_cache, tmp_path):
    """At 56 px the same samples come with the same mixed labels and the same teacher rows."""
    a = next(iter(_data(student_config(fmnist_shards, tiny_cache, tmp_path)).batches(0)))
    b = next(iter(_data(student_config(fmnist_shards, tiny_cache, tmp_path, "data.img_size=56")).batches(0)))
    assert a["image"].shape[-1] == 28 and b["image"].shape[-1] == 56
    assert torch.equal(a["sample_id"], b["sample_id"])
    torch.testing.assert_close(a["target"], b["target"])   # cutmix lam from the normalized box
    assert torch.equal(a["teacher_indices"], b["teacher_indices"])
    # Same crop content: the 56 px image downsampled is close to the 28 px one.
    small = torch.nn.functional.avg_pool2d(b["image"], 2)
    assert (small - a["image"]).abs().mean() < 0.35


def test_invalid_rows_are_dropped_and_counted(fmnist_shards, tiny_cache, tmp_path, monkeypatch):
    cfg = student_config(fmnist_shards, tiny_cache, tmp_path)
    data = _data(cfg)
    real = data.reader.lookup_rows

    def lookup_rows(epoch, sids, views):
        rows = real(epoch, sids, views)
        valid = rows.valid.copy()
        valid[sids % 5 == 0] = False      # as if the teacher never scored these rows
        return rows._replace(valid=valid)

    monkeypatch.setattr(data.reader, "lookup_rows", lookup_rows)
    batches = list(data.batches(0))
    kept = torch.cat([b["sample_id"] for b in batches])
    assert not (kept % 5 == 0).any()
    assert sum(b["dropped"] for b in batches) == len([i for i in range(256) if i % 5 == 0])
    assert all(b["image"].shape[0] == b["teacher_indices"].shape[0] == b["target"].shape[0]
               == b["teacher_log_tail"].shape[0] == b["teacher_tail_code"].shape[0] for b in batches)


def test_not_done_epoch_fails_fast_without_wait(fmnist_shards, tmp_path):
    cache = tmp_path / "partial.zarr"
    build_cache(fmnist_shards, cache, items=[(0, s) for s in range(4)])
    data = _data(student_config(fmnist_shards, cache, tmp_path))
    next(iter(data.batches(0)))
    with pytest.raises(CacheNotReady):
        next(iter(data.batches(1)))


def test_soft_student_logs_fidelity_and_warns_naming_a_k(fmnist_shards, tiny_cache, tmp_path):
    """The fidelity the caching job recorded is logged at the student's τ; poor fidelity names a k."""
    from student.targets import build_targets_fn
    from teacher.fidelity import advice

    cfg = student_config(fmnist_shards, tiny_cache, tmp_path, "loss.mode=soft", "loss.tau=3.0")
    manifest = load_manifest(cfg.data.train)
    reader, plan = open_checked_cache(cfg, manifest)
    lines: list[str] = []
    targets_fn, joins = build_targets_fn(cfg, plan, reader, NUM_CLASSES, "cpu", log=lines.append)
    summary = reader.fidelity()
    assert joins and summary["rows"] == 2 * 256 and summary["ks"] == [1, 3, 5, 10]
    tv = summary["tv"][summary["ks"].index(3)][summary["taus"].index(3.0)]
    assert len(lines) == 1 and "at τ=3:" in lines[0] and f"mean TV {tv:.3f}" in lines[0] and "(k=3," in lines[0]
    # a threshold below this cache's TV turns it into a warning naming the smallest k that stays below
    column = [row[summary["taus"].index(3.0)] for row in summary["tv"]]
    threshold = (tv + min(column)) / 2
    assert min(column) < tv
    line, poor = advice(summary, 3, 3.0, poor_tv=threshold)
    good = [k for k, t in zip(summary["ks"], column) if t <= threshold]
    assert poor and f"a cache with k={good[0]} would give" in line
    line, poor = advice(summary, 3, 2.5, poor_tv=0.0)
    assert poor and "nearest recorded to τ=2.5" in line and "no recorded k does" in line
    # a hard student gets no fidelity line
    hard = student_config(fmnist_shards, tiny_cache, tmp_path, "loss.mode=hard")
    lines.clear()
    build_targets_fn(hard, plan, reader, NUM_CLASSES, "cpu", log=lines.append)
    assert lines == []


def test_prefetch_loads_the_epoch_so_the_join_reads_memory_only(fmnist_shards, tiny_cache, tmp_path, monkeypatch):
    """The epoch's cached rows are loaded by the prefetch thread, off the training loop; after it,
    the per-batch join reads no chunk."""
    import threading

    from storage import CacheReader

    loads: list[str] = []
    real = CacheReader._load

    def noting(self, *args, **kwargs):
        loads.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CacheReader, "_load", noting)
    data = _data(student_config(fmnist_shards, tiny_cache, tmp_path))
    # an epoch started as in training: its prefetch thread loads the shards while the loader starts
    assert sum(len(b["sample_id"]) for b in data.batches(0)) == 256
    assert len(loads) == 4 and any(name.startswith("cache-prefetch") for name in loads), loads
    # the prefetch itself (run here, in this thread) loads every shard of the epoch ...
    loads.clear()
    data._prefetch(1, threading.Event())
    assert loads == ["MainThread"] * 4
    # ... after which the per-batch join reads memory only
    loads.clear()
    assert sum(len(b["sample_id"]) for b in data.batches(1)) == 256 and loads == []
