"""Bring your own WebDataset shards: ``make_shards index`` over shards written by plain
``webdataset.ShardWriter`` in two layouts (``.jpg`` + ``.cls``, shuffled; ``.webp`` + ``.json``,
class-sorted), with shard sizes that vary, each holding one unusable sample (corrupt bytes;
no label). The index names them (shard and key) or lists them with ``--skip-bad``; the sorted
layout gets the class-mix warning; both are cached by the Ray job and trained on for an epoch,
and the caching job and the student treat the listed samples as the same missing rows.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
wds = pytest.importorskip("webdataset")

from PIL import Image  # noqa: E402

from teacher.cache import run_job  # noqa: E402
from teacher.job import CacheJobConfig  # noqa: E402
from pipeline.index import index_shards  # noqa: E402
from fmnist import FMNIST_DIR, require_fmnist  # noqa: E402
from pipeline.make_shards import FMNIST_CLASSES, load_fmnist  # noqa: E402
from pipeline.classmix import class_mix_warning  # noqa: E402
from pipeline.errors import SampleError  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.shards import iter_samples  # noqa: E402
from storage import open_cache  # noqa: E402
from student.data import TrainData, open_checked_cache  # noqa: E402
from student.train import train  # noqa: E402
from teacher.model import TeacherConfig, create_model  # noqa: E402
from test_cache_job import ray_session  # noqa: E402,F401  (the module's embedded Ray)
from test_student_data import AUG, TINY_TEACHER, student_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name -> (image member, label member, class-sorted, shard sizes)
    "jpg_cls": ("jpg", "cls", False, (50, 37, 45, 28)),
    "webp_json": ("webp", "json", True, (40, 25, 57, 38)),
}
BROKEN = {"jpg_cls": (1, 11), "webp_json": (2, 30)}  # (shard, position) of the unusable sample


def _encode(image: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(out, format={"jpg": "JPEG", "webp": "WEBP"}[fmt], quality=90)
    return out.getvalue()


def write_foreign(root: Path, layout: str) -> tuple[str, list[dict]]:
    """Shards as another tool writes them; returns (brace pattern, the samples written in order)."""
    image_ext, label_ext, sorted_, sizes = LAYOUTS[layout]
    images, labels = load_fmnist("train", FMNIST_DIR, sum(sizes))
    order = np.argsort(labels, kind="stable") if sorted_ else np.arange(len(labels))
    root.mkdir(parents=True)
    written, n = [], 0
    with wds.ShardWriter(str(root / "part-%04d.tar"), maxcount=10**6, verbose=0) as sink:
        for shard, size in enumerate(sizes):
            if shard:
                sink.next_stream()  # foreign shards come in whatever sizes their tool chose
            for position in range(size):
                i, n = int(order[n]), n + 1
                key = f"img{i:05d}"
                sample = {"__key__": key, image_ext: _encode(images[i], image_ext)}
                if label_ext == "cls":
                    sample["cls"] = int(labels[i])
                else:
                    sample["json"] = {"label": int(labels[i]), "filename": f"{key}.JPEG"}
                if (shard, position) == BROKEN[layout]:
                    if layout == "jpg_cls":
                        sample["jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
                    else:
                        del sample["json"]  # unlabeled
                sink.write(sample)
                written.append({"key": key, "label": int(labels[i]), "shard": f"part-{shard:04d}.tar",
                                "data": sample[image_ext]})
    return str(root / f"part-{{0000..{len(sizes) - 1:04d}}}.tar"), written


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """layout -> (shard pattern, samples written, manifest folder indexed with --skip-bad)."""
    require_fmnist()
    base = tmp_path_factory.mktemp("foreign")
    classes = base / "classes.txt"
    classes.write_text("\n".join(c.replace(" ", "_") for c in FMNIST_CLASSES) + "\n")
    out = {}
    for layout in LAYOUTS:
        pattern, written = write_foreign(base / layout, layout)
        manifest = base / "manifests" / layout / "train"
        extra = ["--classes", str(classes)] if layout == "webp_json" else []
        r = subprocess.run([sys.executable, "-m", "pipeline.make_shards", "index", pattern, "--out", str(manifest),
                            "--skip-bad", "--workers", "2", *extra], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[layout] = (pattern, written, manifest, r.stderr)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_index_records_what_is_there(foreign, layout):
    pattern, written, manifest, stderr = foreign[layout]
    m = load_manifest(manifest)
    sizes = LAYOUTS[layout][3]
    assert [s.count for s in m.shards] == list(sizes) and m.shard_size == max(sizes)
    assert [s.first_id for s in m.shards] == list(np.cumsum((0,) + sizes[:-1]))
    assert [m.shard_of(s.first_id + s.count - 1).index for s in m.shards] == [0, 1, 2, 3]
    assert [s.url for s in m.shards] == [str(Path(pattern).parent / f"part-{i:04d}.tar") for i in range(4)]
    assert m.num_classes == 10 and (m.classes[0] == "T-shirt/top") == (layout == "webp_json")
    shard, position = BROKEN[layout]
    bad = written[sum(sizes[:shard]) + position]
    reason = "cannot decode jpg" if layout == "jpg_cls" else "no label"
    assert [(b["shard"], b["key"], b["sample_id"]) for b in m.bad_samples()] == [
        (bad["shard"], bad["key"], sum(sizes[:shard]) + position)]
    assert reason in m.bad_samples()[0]["error"] and bad["key"] in stderr
    good = [w for w in written if w is not bad]
    for s in m.shards:
        counts = {}
        for w in good:
            if w["shard"] == s.name:
                counts[w["label"]] = counts.get(w["label"], 0) + 1
        assert dict(s.class_counts) == counts
    samples = list(iter_samples(m, verify=True))   # ids are positions: no .sid in these shards
    assert [s.sample_id for s in samples] == list(range(m.num_samples))
    for s, w in zip(samples, written):
        assert (s.key, s.data) == (w["key"], w["data"])
        assert s.label == (-1 if w is bad else w["label"]) and (s.error is not None) == (w is bad)
    sorted_ = LAYOUTS[layout][2]
    assert (class_mix_warning(m) is not None) == sorted_
    assert ("look class-sorted" in stderr) == sorted_


def test_unusable_sample_named_without_skip_bad(foreign, tmp_path):
    pattern, written, _, _ = foreign["jpg_cls"]
    with pytest.raises(SampleError, match=r"shard part-0001.tar key img00061: cannot decode jpg.*position 11"):
        index_shards(pattern, str(tmp_path / "m"))
    r = subprocess.run([sys.executable, "-m", "pipeline.make_shards", "index", foreign["webp_json"][0], "--out",
                        str(tmp_path / "n"), "--workers", "1"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "shard part-0002.tar key img" in r.stderr and "no label" in r.stderr
    assert not (tmp_path / "n" / "manifest.json").exists()


def _skipped_rows(records) -> set[tuple[int, int]]:
    return {(r["sample_id"], r["view"]) for r in records}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_foreign_shards_cached_and_trained(foreign, layout, ray_session, tmp_path):
    """The Ray job caches them (slots of the largest shard); the listed sample and the rows that mix
    it in are missing rows, recorded with shard and key; a student epoch reads every other row, and
    the student's loader skips exactly the rows the cache lacks."""
    _, written, manifest, _ = foreign[layout]
    m = load_manifest(manifest)
    weights = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model(TeacherConfig.from_dict(TINY_TEACHER)).state_dict(), weights)
    cfg = CacheJobConfig.from_dict({
        "shards": str(manifest), "out": str(tmp_path / "cache.zarr"), "epochs": 1, "views": 2, "k": 3, "seed": 7,
        "batch_size": 64, "num_workers": 0, "actors": 1, "aug": AUG,
        "teacher": {**TINY_TEACHER, "checkpoint": str(weights)}})
    summary = run_job(cfg, progress=False)
    bad = m.bad_samples()[0]
    assert {(r["shard"], r["key"]) for r in summary["skipped"]} >= {(bad["shard"], bad["key"])}
    assert all(r["shard"] == bad["shard"] for r in summary["skipped"])   # partners come from the same shard
    reader = open_cache(cfg.out)
    ids, views = np.repeat(np.arange(m.num_samples), 2), np.tile(np.arange(2), m.num_samples)
    valid = reader.lookup_rows(0, ids, views).valid
    cached_missing = {(int(i), int(v)) for i, v in zip(ids[~valid], views[~valid])}
    assert cached_missing == _skipped_rows(summary["skipped"]) == _skipped_rows(reader.missing_records())
    assert (bad["sample_id"], 0) in cached_missing and (bad["sample_id"], 1) in cached_missing

    run = tmp_path / "student"
    scfg = student_config(REPO, cfg.out, run, f"data.train={manifest}", "data.val=null", "run.epochs=2")
    reader, plan = open_checked_cache(scfg, m)
    data = TrainData(scfg, m, plan, reader, log=lambda *_: None)
    replay_skipped = set()
    for epoch in (0, 1):   # two student epochs = the cache epoch's two parts
        loader = data.loader(epoch)
        for _ in loader:
            pass
        replay_skipped |= _skipped_rows(loader.skipped)
    assert replay_skipped == cached_missing

    metrics = train(student_config(REPO, cfg.out, run, f"data.train={manifest}", "data.val=null"))
    assert metrics["train_images"] + metrics["train_dropped"] == m.num_samples
    assert 0 < metrics["train_dropped"] <= len(cached_missing)
    assert np.isfinite(metrics["train_loss"])
