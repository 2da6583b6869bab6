"""``student.train --dry-run``: DeiT's schedule on an ImageNet-sized manifest, without a model or an image."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from teacher.job import CacheJobConfig, cache_attrs, open_writer
from pipeline.config import load_config
from pipeline.manifest import ShardInfo, load_manifest, manifest_dict
from student.train import main

REPO = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167


def imagenet_sized_split(root: Path) -> Path:
    """A manifest of ImageNet-1k's train split (1282 shards of 1000, the last 167); no tar files."""
    split = root / "train"
    split.mkdir(parents=True)
    counts = [1000] * 1281 + [IMAGENET_TRAIN - 1281 * 1000]
    shards = [ShardInfo(f"train-{i:06d}.tar", i, 1000 * i, c, 100_000_000, "0" * 64) for i, c in enumerate(counts)]
    classes = [f"n{i:08d}" for i in range(1000)]
    (split / "manifest.json").write_text(json.dumps(manifest_dict("train", classes, 1000, shards, [], "test", {})))
    return split


def imagenet_split_and_empty_cache(tmp_path: Path) -> tuple[Path, Path]:
    """The ImageNet-sized split and the (empty) cache the caching job creates when it starts:
    100 epochs x 3 views, k=10 (configs/cache/imagenet_regnety160.yaml)."""
    split = imagenet_sized_split(tmp_path / "imagenet-wds")
    cache = tmp_path / "cache.zarr"
    job = load_config(CacheJobConfig, REPO / "configs/cache/imagenet_regnety160.yaml",
                      [f"shards={split}", f"out={cache}", "teacher.checkpoint=null"])
    manifest = load_manifest(split)
    open_writer(job, manifest, cache_attrs(job, manifest))
    return split, cache


def test_imagenet_config_dry_run(tmp_path, monkeypatch, capsys):
    split, cache = imagenet_split_and_empty_cache(tmp_path)

    import student.models

    def no_model(*a, **k):
        raise AssertionError("the dry run must not build a model")

    monkeypatch.setattr(student.models, "build_student", no_model)
    report = main(["--config", str(REPO / "configs/student/deit_s_imagenet_hard.yaml"), "--dry-run",
                   "--world-size", "8", f"data.train={split}", f"cache.path={cache}", "data.val=null"])
    assert report["epochs"] == 300 and report["images_per_epoch"] == IMAGENET_TRAIN
    assert report["rows_per_epoch"] == [IMAGENET_TRAIN] * 300
    assert report["total_images"] == 300 * IMAGENET_TRAIN
    assert (report["cached_epochs"], report["views"], report["sampler"]) == (100, 3, "ra")
    # 8 ranks x 128: each rank holds 160,145 or 160,146 rows per epoch -> 1252 steps
    assert report["batch_per_rank"] == 128 and report["steps_per_epoch"] == report["updates_per_epoch"] == 1252
    assert report["warmup_updates"] == 5 * 1252 and report["total_updates"] == 300 * 1252
    lr = dict(report["lr_points"])
    assert lr[0] == pytest.approx(1e-6) and lr[5 * 1252] == pytest.approx(1e-3, rel=1e-3)
    assert lr[300 * 1252 - 1] == pytest.approx(1e-5, rel=1e-2)
    # 300 student epochs = 100 cache epochs x 3 parts: every cached row read exactly once
    assert report["each_row_once_per_pass"] and report["complete_passes"] == 1 and report["epochs_per_pass"] == 300
    assert sorted((e, p) for _, e, p, _, _ in report["sources"]) == [(e, p) for e in range(100) for p in range(3)]
    out = capsys.readouterr().out
    assert "1,281,167" in out and "300 epochs" in out and "every cached row read exactly once" in out


def test_dry_run_shows_the_cycle_when_training_longer_than_the_cache(tmp_path):
    split = imagenet_sized_split(tmp_path / "d")
    cache = tmp_path / "c.zarr"
    job = load_config(CacheJobConfig, REPO / "configs/cache/imagenet_regnety160.yaml",
                      [f"shards={split}", f"out={cache}", "teacher.checkpoint=null", "epochs=2"])
    manifest = load_manifest(split)
    open_writer(job, manifest, cache_attrs(job, manifest))
    report = main(["--config", str(REPO / "configs/student/deit_s_imagenet_hard.yaml"), "--dry-run",
                   f"data.train={split}", f"cache.path={cache}", "data.val=null", "run.epochs=9",
                   "data.sampler=one_view"])
    assert [s[1:4] for s in report["sources"][:7]] == [(0, None, 0), (0, None, 1), (0, None, 2), (1, None, 0),
                                                     (1, None, 1), (1, None, 2), (0, None, 0)]
    assert report["complete_passes"] == 1 and report["each_row_once_per_pass"]


def test_order_out_from_the_manifest_alone(tmp_path, capsys):
    """Before the cache exists, ``--dry-run --order-out`` writes every row's (epoch, step, rank,
    position) from the manifest and the config; the views of a sample share a step (8 x 128)."""
    split = tmp_path / "wds" / "train"
    split.mkdir(parents=True)
    counts = [1000] * 24 + [517]
    shards = [ShardInfo(f"train-{i:06d}.tar", i, 1000 * i, c, 100_000_000, "0" * 64) for i, c in enumerate(counts)]
    (split / "manifest.json").write_text(json.dumps(manifest_dict("train", [f"c{i}" for i in range(10)], 1000,
                                                                  shards, [], "test", {})))
    csv = tmp_path / "order.csv"
    report = main(["--config", str(REPO / "configs/student/deit_s_imagenet_hard.yaml"), "--dry-run",
                   "--world-size", "8", "--order-out", str(csv), "--order-epochs", "2",
                   f"data.train={split}", f"cache.path={tmp_path / 'not-yet.zarr'}", "data.val=null",
                   "data.views=3", "data.seed=0"])
    out = capsys.readouterr().out
    assert "no cache at" in out and "views sharing a step" in out
    lines = csv.read_text().splitlines()
    assert lines[0] == "epoch,step,rank,position,sample_id,view"
    rows = [tuple(map(int, line.split(","))) for line in lines[1:]]
    n = sum(counts)
    for t in (0, 1):
        mine = [r for r in rows if r[0] == t]
        assert len(mine) == n and len({(a, v) for _, _, _, _, a, v in mine}) == n
        per_rank = Counter(rank for _, _, rank, _, _, _ in mine)
        assert max(per_rank.values()) - min(per_rank.values()) <= 1 and len(per_rank) == 8
        assert max(p for _, _, _, p, _, _ in mine) == 127
    # epochs 0 and 1 read disjoint parts of cache epoch 0: no (sample, view) row twice
    assert len({(a, v) for *_, a, v in rows}) == 2 * n
    steps: dict = {}
    for t, step, _, _, a, _ in rows:
        steps.setdefault((t, a), []).append(step)
    whole = [s for s in steps.values() if len(s) == 3]
    assert sum(len(set(s)) == 1 for s in whole) / len(whole) >= 0.99
    assert report["views_share_a_step"] >= 0.99


def test_dry_run_with_deits_options_and_the_recipe_block(tmp_path, capsys):
    split, cache = imagenet_split_and_empty_cache(tmp_path)
    args = ["--config", str(REPO / "configs/student/deit_s_imagenet_hard.yaml"), "--dry-run", "--world-size", "8",
            f"data.train={split}", f"cache.path={cache}", "data.val=null"]
    report = main(args + ["data.drop_last=true", "optim.lr_step=epoch", "run.amp=fp16", "data.eval_resize=deit"])
    # drop_last: 160,145 rows on the smallest rank // 128 = 1251 steps, DeiT's count at 8 x 128
    assert report["steps_per_epoch"] == 1251
    lr = dict(report["lr_points"])
    # per-epoch stepping one epoch late: update 5 x 1251 (epoch 5) still trains at the warmup's last value
    assert lr[0] == pytest.approx(1e-6) and lr[5 * 1251] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 4 / 5)
    out = capsys.readouterr().out
    assert f"DeiT's recipe beside this config (plan from cache {cache}" in out
    for element in ("lr stepping", "AMP dtype", "eval transform", "drop_last"):
        assert re.search(rf"^  = {re.escape(element)} ", out, re.M), (element, out)
    assert re.search(r"^  ≠ Mixup/CutMix .*per sample", out, re.M)
    main(args)
    out = capsys.readouterr().out
    assert re.search(r"^  ≠ lr stepping +per optimizer update.*option: optim.lr_step=epoch", out, re.M)
