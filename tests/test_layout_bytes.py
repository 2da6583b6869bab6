"""Stored bytes do not depend on where the code lives (issue 19, the layout change).

The same ImageFolder is sharded, and the same shards are cached (a random regnety_002 teacher,
2 epochs x 2 views, k = 3, a learned tail), once by the code of ``BASELINE`` (the last commit
before the layout change, exported with ``git archive``: the repository is only read) and once
by this checkout, each through its own command line. Every file of the shards and of the Zarr
store must be byte-identical: chunks, done markers (with their fidelity records), metadata.

A later change that is meant to change stored bytes moves ``BASELINE`` to its own last commit
(and ``DIGESTS``) and says so in its notes. A clone without that commit (shallow) compares the
digests of both trees with ``DIGESTS``, recorded from ``BASELINE``'s run on the 2-core x86 CPU
machine (the shards' digest holds anywhere; the cache's holds where the teacher's float
arithmetic is the same).
"""
from __future__ import annotations

import filecmp
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_imagefolder
from teacher.model import TeacherConfig, create_model

REPO = Path(__file__).resolve().parents[1]
BASELINE = "7383baf"   # tests/test_dryrun: one helper ... (the last commit with the job in pipeline/)
# sha256 over (path, sha256 of the file) of each tree, as written by BASELINE (summary.json left out)
DIGESTS = {"shards": "eb876358223821ee2d5246d27b2a4f80320df5a88df0ec8a7b9ca70334067767",
           "cache": "a3e429c37af1ef26c30ccead3bdf8aa5a3ab951abc72a33635a47eb9e9025961"}
TINY_TEACHER = {"name": "regnety_002", "num_classes": 10, "input_size": 32, "stem_stride": 1,
                "amp": "none", "channels_last": False}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path | None:
    """BASELINE's tree, exported (no worktree, no change to the repository); None without the commit."""
    have = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BASELINE}^{{commit}}"],
                          capture_output=True)
    if have.returncode != 0:
        return None
    out = tmp_path_factory.mktemp("baseline")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(out, filter="data")
    return out


def run_in(tree: Path, *args: str) -> None:
    """``python -m ARGS`` with ``tree``'s packages first on the path (Ray workers inherit it)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{tree}: python -m {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256()
    for p in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in skip):
        h.update(f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def assert_same_tree(a: Path, b: Path) -> int:
    """Every file under a and b byte-identical, the same names; returns the file count."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b, f"file lists differ: only before {set(files_a) - set(files_b)}, " \
                               f"only after {set(files_b) - set(files_a)}"
    differ = [str(f) for f in files_a if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert not differ, f"{len(differ)} of {len(files_a)} files differ, e.g. {differ[:5]}"
    return len(files_a)


def make_shards(tree: Path, images: Path, out: Path) -> Path:
    run_in(tree, "pipeline.make_shards", "imagefolder", "--train-dir", str(images), "--out", str(out),
           "--shard-size", "8")
    return out


def make_cache(tree: Path, module: str, config: Path, out: Path) -> Path:
    run_in(tree, module, "--config", str(config), f"out={out}", "--no-progress")
    (out / "summary.json").unlink()   # timings: the one file that differs between two runs of one commit
    return out


def test_shards_and_cache_bytes_match_the_commit_before_the_layout_change(baseline, tmp_path):
    images = build_imagefolder(tmp_path / "images", classes=tuple(f"c{i}" for i in range(10)), per_class=4,
                               size=(40, 30))
    shards = make_shards(REPO, images, tmp_path / "shards-after")
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save(create_model(TeacherConfig(**TINY_TEACHER)).state_dict(), ckpt)
    cfg = {"shards": str(shards / "train"), "out": "unset", "epochs": 2, "views": 2, "k": 3, "seed": 0,
           "batch_size": 16, "num_workers": 0, "actors": 1, "max_retries": 0,
           "teacher": {**TINY_TEACHER, "checkpoint": str(ckpt)},
           "tail": {"dim": 4, "step": 0.25, "calibration_rows": 32}}
    config = tmp_path / "cache.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cache = make_cache(REPO, "teacher.cache", config, tmp_path / "cache-after.zarr")
    assert list(cache.glob("tail_code/c/*/*/0/0")), "no tail code chunk written: the tail path is not exercised"
    # the manifest names the source folder and the root zarr.json the job's absolute paths (this
    # run's temporary folders): the digests leave them out; the tree comparison below does not
    digests = {"shards": tree_digest(shards, skip=("train/manifest.json",)),
               "cache": tree_digest(cache, skip=("zarr.json",))}
    print("digests", digests)
    if baseline is None:   # a clone without BASELINE: the recorded digests of its run stand in for it
        assert digests == DIGESTS, f"commit {BASELINE} is not in this clone, and the stored bytes differ " \
                                   f"from the digests recorded from its run: {digests} vs {DIGESTS}"
        return
    assert assert_same_tree(make_shards(baseline, images, tmp_path / "shards-before"), shards) >= 6  # 5 tars, manifest
    before = make_cache(baseline, "pipeline.cache", config, tmp_path / "cache-before.zarr")
    assert assert_same_tree(before, cache) >= 20
