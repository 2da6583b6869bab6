"""Replay loader: pixels independent of workers/batching/interleave/order/process; skips reported;
exact rank blocks; the loader replays exactly the caching job's rows."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.loader import LoaderConfig, ReplayLoader
from pipeline.plan import AugConfig
from pipeline.replay import ReplayRequest, replay_items
from pipeline.schedule import Schedule, epoch_cut, shard_pairs
from pipeline.errors import ShardError
from pipeline.manifest import load_manifest
from pipeline.shards import read_shard

REPO = Path(__file__).resolve().parents[1]
CFG = AugConfig()  # DeiT defaults: RandAugment, erasing, Mixup/CutMix on
OUT = 32
SEED, VIEWS, CACHED = 3, 2, 3


def digests(loader) -> dict[tuple[int, int, int], str]:
    """sha256 of image+target bytes per (cache epoch, sample_id, view); asserts each appears once."""
    out = {}
    for b in loader:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, OUT, OUT)
        assert torch.allclose(b["target"].sum(1), torch.ones(len(b["target"])), atol=1e-6)
        for i in range(len(b["label"])):
            k = (int(b["epoch"][i]), int(b["sample_id"][i]), int(b["view"][i]))
            assert k not in out, f"duplicate {k}"
            h = hashlib.sha256(b["image"][i].numpy().tobytes() + b["target"][i].numpy().tobytes())
            out[k] = h.hexdigest()
    return out


def loaders(split_dir, epochs=(4, 5), sampler="one_view", rank=0, world_size=1, order=0, on_skip=None,
            **kw) -> list[ReplayLoader]:
    """Loaders of student epochs ``epochs`` (default: both views of cache epoch 2)."""
    m = load_manifest(split_dir)
    sched = Schedule(m.shards, VIEWS, CACHED, SEED, sampler=sampler, order_seed=order)
    cfg = LoaderConfig(**{"batch_size": 1, "out_size": OUT, **kw})
    return [ReplayLoader(m, CFG, SEED, sched.order(t, rank, world_size, cfg.batch_size, lanes=cfg.lanes,
                                                   interleave=cfg.interleave), cfg, on_skip=on_skip)
            for t in epochs]


def all_digests(split_dir, **kw) -> dict:
    out = {}
    for ld in loaders(split_dir, **kw):
        got = digests(ld)
        assert not set(got) & set(out)
        out.update(got)
    return out


SUBPROCESS = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[2])
from test_replay import all_digests
print(json.dumps({",".join(map(str, k)): v for k, v in
                  all_digests(sys.argv[1], batch_size=5, num_workers=1, order=11).items()}))
"""


def test_pixels_independent_of_workers_batch_interleave_sampler_process(rgb_shards):
    split = rgb_shards / "train"
    m = load_manifest(split)
    ref = all_digests(split)
    assert set(ref) == {(2, i, v) for i in range(m.num_samples) for v in range(VIEWS)}
    assert all_digests(split, num_workers=2, batch_size=7, order=5) == ref
    assert all_digests(split, batch_size=4, interleave=1, order=6) == ref
    assert all_digests(split, batch_size=3, interleave=3, num_workers=3) == ref
    # the RASampler-style epochs of the same cache epoch replay the very same rows
    assert all_digests(split, sampler="ra", batch_size=6, num_workers=2) == ref
    r = subprocess.run([sys.executable, "-c", SUBPROCESS, str(split), str(REPO / "tests")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fresh = {tuple(map(int, k.split(","))): v for k, v in json.loads(r.stdout).items()}
    assert fresh == ref
    # the loader replays exactly the caching job's rows (replay_items over shard_pairs)
    direct = {}
    cut = epoch_cut(SEED, 2, VIEWS)
    for view in range(VIEWS):
        for s in m.shards:
            for it in replay_items(ReplayRequest(CFG, SEED, 2, view, OUT, m.num_classes), read_shard(m, s), s,
                                   shard_pairs(cut, view, s)):
                h = hashlib.sha256(it.image.numpy().tobytes() + it.target.numpy().tobytes()).hexdigest()
                direct[(2, it.sample_id, view)] = h
    assert direct == ref


def test_fmnist_two_workers_and_mixing(fmnist_shards):
    split = fmnist_shards / "train"
    ref = all_digests(split, epochs=(0,), batch_size=16)
    assert all_digests(split, epochs=(0,), batch_size=7, num_workers=2) == ref
    (ld,) = loaders(split, epochs=(0,), batch_size=64)
    targets = torch.cat([b["target"] for b in ld])
    assert len(targets) == 256
    assert (targets.max(1).values < 1).float().mean() > 0.5, "Mixup/CutMix should mix most targets"


def test_extra_size_is_the_same_replay_at_another_resolution(rgb_shards):
    """``extra_size`` renders each row a second time: what the loader gives at that size itself."""
    split = rgb_shards / "train"
    (ld,) = loaders(split, epochs=(4,), batch_size=4, extra_size=48)
    (big,) = loaders(split, epochs=(4,), batch_size=4, out_size=48)
    extra = {(int(e), int(s), int(v)): x for b in ld for e, s, v, x in
             zip(b["epoch"], b["sample_id"], b["view"], b["extra_image"])}
    plain = {(int(e), int(s), int(v)): x for b in big for e, s, v, x in
             zip(b["epoch"], b["sample_id"], b["view"], b["image"])}
    assert extra.keys() == plain.keys() and all(torch.equal(extra[k], plain[k]) for k in plain)


def test_order_changes_with_seed_not_content(rgb_shards):
    split = rgb_shards / "train"
    order = lambda **kw: [int(i) for b in loaders(split, epochs=(4,), batch_size=5, **kw)[0]
                          for i in b["sample_id"]]
    plain, other = order(order=0), order(order=1)
    assert plain != other and sorted(plain) == sorted(other)
    assert order(order=1) == other  # explicit seed: reproducible order


def _corrupt_member(tar_path: Path, key: str) -> None:
    """Rewrite a shard with the image bytes of ``key`` truncated (tar itself stays valid)."""
    members = []
    with tarfile.open(tar_path) as tar:
        for info in tar:
            data = tar.extractfile(info).read()
            if info.name.startswith(key + ".") and info.name.split(".")[-1] in ("jpg", "png"):
                data = data[:30]
                info.size = len(data)
            members.append((info, data))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_is_reported(rgb_shards, tmp_path, num_workers):
    split = tmp_path / "train"
    shutil.copytree(rgb_shards / "train", split)
    m = load_manifest(split)
    bad = read_shard(m, m.shards[1])[2]
    _corrupt_member(Path(m.url(1)), bad.key)
    seen = []
    lds = loaders(split, batch_size=3, num_workers=num_workers, on_skip=seen.append)
    got = {}
    for ld in lds:
        got.update(digests(ld))
    records = [r for ld in lds for r in ld.skipped]
    skipped = {(r["epoch"], r["sample_id"], r["view"]): r for r in records}
    assert seen == records
    assert set(got) | set(skipped) == {(2, i, v) for i in range(m.num_samples) for v in (0, 1)}
    assert not set(got) & set(skipped)
    for v in (0, 1):
        own = skipped[(2, bad.sample_id, v)]
        assert own["shard"] == "train-000001.tar" and own["key"] == bad.key and own["epoch"] == 2
        assert "cannot decode" in own["reason"]
    partners = [r for r in records if r["sample_id"] != bad.sample_id]
    assert partners, "the corrupt sample's mix partners must be skipped too"
    assert all(r["shard"] == "train-000001.tar" and bad.key in r["reason"] for r in partners)
    # every other item is unchanged
    clean = all_digests(rgb_shards / "train", batch_size=3)
    assert all(clean[k] == h for k, h in got.items())


@pytest.mark.parametrize("cut", ["middle", "boundary"])
def test_truncated_tar_raises_naming_shard(rgb_shards, tmp_path, cut):
    split = tmp_path / "train"
    shutil.copytree(rgb_shards / "train", split)
    m = load_manifest(split)
    path = Path(m.url(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100] if cut == "middle" else data[: 512 * 3 * 2])
    with pytest.raises(ShardError, match="train-000001.tar"):
        all_digests(split, batch_size=4)
    with pytest.raises(ShardError, match="train-000001.tar"):
        all_digests(split, batch_size=4, num_workers=2)


def test_missing_shard_raises(rgb_shards, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(rgb_shards / "train", split)
    Path(load_manifest(split).url(2)).unlink()
    with pytest.raises(ShardError, match="train-000002.tar"):
        all_digests(split)


def test_rank_blocks_cover_every_row_once(rgb_shards):
    split = rgb_shards / "train"
    m = load_manifest(split)
    ref = all_digests(split, sampler="ra", epochs=(4, 5))
    sched = Schedule(m.shards, VIEWS, CACHED, SEED, sampler="ra")
    for workers in (0, 2):
        union = {}
        for rank in (0, 1):
            for t, ld in zip((4, 5), loaders(split, sampler="ra", epochs=(4, 5), batch_size=4, rank=rank,
                                             world_size=2, num_workers=workers)):
                batches = list(ld)
                assert len(batches) == len(ld) == sched.steps(t, 4, 2)
                assert all(len(b["label"]) == 4 for b in batches[:-1])
                got = digests(batches)
                assert not set(got) & set(union)
                union.update(got)
        assert union == ref
    steps = sched.steps(4, 4, 2)
    for rank in (0, 1):
        (ld,) = loaders(split, sampler="ra", epochs=(4,), batch_size=4, rank=rank, world_size=2,
                        max_batches=steps - 1, num_workers=2)
        assert len(list(ld)) == len(ld) == steps - 1
