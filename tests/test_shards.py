"""Shards: round trip with stable sample ids, manifest checks, corrupt inputs, Fashion-MNIST slice."""
from __future__ import annotations

import json
import os
from collections import Counter
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmnist import FMNIST_DIR
from pipeline.make_shards import FMNIST_CLASSES, load_fmnist, main as make_shards_main
from conftest import verify_manifest
from pipeline.decode import decode_image
from pipeline.errors import SampleError, ShardError
from pipeline.manifest import ShardInfo, load_manifest
from pipeline.shards import iter_samples, read_shard
from pipeline.writer import shuffled

REPO = Path(__file__).resolve().parents[1]


def _source_files(root: Path) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in root.iterdir())
    return [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).iterdir())]


def test_imagefolder_round_trip_cli(tmp_path, make_imagefolder):
    src = tmp_path / "src"
    make_imagefolder(src / "train", per_class=5)
    make_imagefolder(src / "val", per_class=2, seed=1)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pipeline.make_shards", "imagefolder", "--root", str(src),
                        "--out", str(out), "--shard-size", "4"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for split, n in (("train", 15), ("val", 6)):
        m = load_manifest(out / split)
        verify_manifest(m)
        assert m.num_samples == n and m.classes == ["cat", "dog", "eel"] and m.num_classes == 3
        assert [s.count for s in m.shards] == [4] * (n // 4) + [n % 4]
        assert [s.first_id for s in m.shards] == [4 * i for i in range(len(m.shards))]
        files = shuffled(_source_files(src / split), 0)   # the default seeded global order
        samples = list(iter_samples(m, verify=True))
        assert [s.sample_id for s in samples] == list(range(n))
        assert m.order == {"shuffle_seed": 0}
        for shard in m.shards:
            got = Counter(s.label for s in samples if s.shard == shard.name)
            assert dict(shard.class_counts) == dict(got)
        for s, (path, label) in zip(samples, files):
            assert s.data == path.read_bytes(), f"bytes changed for {path}"
            assert s.label == label and s.key == path.stem
            assert s.ext == path.suffix[1:]
            assert decode_image(s).mode == "RGB"
            assert m.shard_of(s.sample_id).name == s.shard


def test_rewrite_is_byte_identical(tmp_path, make_imagefolder):
    src = make_imagefolder(tmp_path / "src")
    args = ["imagefolder", "--train-dir", str(src), "--shard-size", "5"]
    make_shards_main(args + ["--out", str(tmp_path / "a")])
    make_shards_main(args + ["--out", str(tmp_path / "b")])
    first = load_manifest(tmp_path / "a" / "train").sha256
    assert first == load_manifest(tmp_path / "b" / "train").sha256
    make_shards_main(args + ["--out", str(tmp_path / "a")])          # same command: the split is kept
    assert load_manifest(tmp_path / "a" / "train").sha256 == first
    for other in (["--shard-size", "4"], ["--shuffle-seed", "1"], ["--keep-order"]):
        with pytest.raises(FileExistsError, match="complete split"):
            make_shards_main(args + other + ["--out", str(tmp_path / "a")])
    make_shards_main(args + ["--keep-order", "--overwrite", "--out", str(tmp_path / "a")])
    m = load_manifest(tmp_path / "a" / "train")
    assert m.order == {"shuffle_seed": None}
    assert [s.key for s in iter_samples(m)] == [p.stem for p, _ in _source_files(src)]   # source order


def test_slot_is_the_largest_shard_not_the_configured_size(tmp_path, make_imagefolder, capsys):
    """A split smaller than --shard-size: one shard of 12 in a slot of 12 rows (no padding, no note);
    the configured size stays in the manifest (it names the command), the cache's slot does not use it."""
    from pipeline.index import padding
    from storage import open_cache
    from storage.cache import create_cache

    src = make_imagefolder(tmp_path / "src")                               # 3 classes x 4 images
    for size, counts, pad in (("1000", [12], 0.0), ("5", [5, 5, 2], 0.2)):
        out = tmp_path / f"o{size}"
        make_shards_main(["imagefolder", "--train-dir", str(src), "--out", str(out), "--shard-size", size])
        err = capsys.readouterr().err
        m = load_manifest(out / "train")
        assert m.shard_size == int(size) and [s.count for s in m.shards] == counts
        assert padding(m) == pytest.approx(pad)
        assert ("of them padding" in err) == (pad > 0.1), err
        if pad:
            assert "shard sizes vary (2..5 samples): the cache gives every shard a slot of 5 rows, 20%" in err, err
        create_cache(out / "c.zarr", shards=m.shards, epochs=1, views=1, k=3, num_classes=3, attrs={})
        reader = open_cache(out / "c.zarr")
        assert reader.slot == max(counts) and reader.group["valid"].shape == (1, len(counts) * max(counts), 1)


def test_tampered_and_truncated_shard(tmp_path, make_imagefolder):
    src = make_imagefolder(tmp_path / "src")
    make_shards_main(["imagefolder", "--train-dir", str(src), "--out", str(tmp_path / "o"), "--shard-size", "5"])
    m = load_manifest(tmp_path / "o" / "train")
    target = m.shards[1]
    path = Path(m.url(target))
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first image's bytes; same size
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000001.tar.*sha256"):
        verify_manifest(m)
    with pytest.raises(ShardError, match="train-000001.tar"):
        read_shard(m, target, verify=True)

    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ShardError, match="train-000001.tar.*size"):
        verify_manifest(m)
    with pytest.raises(ShardError, match="train-000001.tar"):
        read_shard(m, target)
    # cut at a member boundary: tarfile sees a clean end, the count check must catch it
    path.write_bytes(bytes(data[: 512 * 3]))
    with pytest.raises(ShardError, match="train-000001.tar"):
        read_shard(m, target)
    path.unlink()
    with pytest.raises(ShardError, match="train-000001.tar.*missing"):
        read_shard(m, target)


def test_wrong_sid_is_reported(tmp_path, make_imagefolder):
    src = make_imagefolder(tmp_path / "src")
    make_shards_main(["imagefolder", "--train-dir", str(src), "--out", str(tmp_path / "o"), "--shard-size", "5", "--keep-order"])
    m = load_manifest(tmp_path / "o" / "train")
    shifted = ShardInfo(**{**m.shards[1].__dict__, "first_id": 6})
    with pytest.raises(ShardError, match=r"train-000001.tar key dog_1: sid 5 at position 0"):
        read_shard(m, shifted)


def test_corrupt_image_error_and_skip_bad(tmp_path, make_imagefolder):
    src = make_imagefolder(tmp_path / "src")
    bad = src / "dog" / "dog_1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    (src / "dog" / "notes.txt").write_text("not an image")  # ignored (non-image extension)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "pipeline.make_shards", "imagefolder", "--train-dir", str(src),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    assert not (out / "train" / "manifest.json").exists()

    r = subprocess.run([sys.executable, "-m", "pipeline.make_shards", "imagefolder", "--train-dir", str(src),
                        "--out", str(out), "--skip-bad", "--overwrite", "--shard-size", "5"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = load_manifest(out / "train")
    assert m.num_samples == 11 and [s.count for s in m.shards] == [5, 5, 1]
    assert [s["path"] for s in m.skipped] == [str(bad)]
    assert "cannot decode" in m.skipped[0]["error"]
    assert "dog_1" not in {s.key for s in iter_samples(m)}


def test_decode_image_names_shard_and_key(rgb_shards):
    m = load_manifest(rgb_shards / "train")
    raw = read_shard(m, m.shards[0])[3]
    raw.data = raw.data[:40]
    with pytest.raises(SampleError, match=f"shard train-000000.tar key {raw.key}") as info:
        decode_image(raw)
    assert info.value.key == raw.key and info.value.shard == "train-000000.tar"


def test_manifest_helpers(rgb_shards):
    m = load_manifest(rgb_shards / "train")
    assert [s.count for s in m.shards] == [8, 8, 5] and m.num_samples == 21
    assert m.shard_of(0).index == 0 and m.shard_of(15).index == 1 and m.shard_of(20).index == 2
    with pytest.raises(IndexError):
        m.shard_of(21)
    d = json.loads((rgb_shards / "train" / "manifest.json").read_text())
    assert d["version"] == 3 and d["skipped"] == [] and d["source"] == "rgb fixture"


def test_manifest_ids_must_be_contiguous(rgb_shards, tmp_path):
    """Shards may hold any counts, but ids follow shard order without gaps; a manifest that says
    otherwise is refused naming the shard."""
    d = json.loads((rgb_shards / "train" / "manifest.json").read_text())
    for change, message in (({"first_id": 9}, "shard train-000001.tar: first_id/count 9/8, expected first_id 8"),
                            ({"count": 0}, "shard train-000001.tar: first_id/count 8/0.*count in \\[1, 8\\]")):
        bad = json.loads(json.dumps(d))
        bad["shards"][1].update(change)
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ShardError, match=message):
            load_manifest(tmp_path / "m")


def test_fmnist_slice_matches_idx(fmnist_shards):
    for split, n in (("train", 256), ("val", 128)):
        m = load_manifest(fmnist_shards / split)
        verify_manifest(m)
        assert m.num_samples == n and m.classes == FMNIST_CLASSES and m.shard_size == 64
        images, labels = load_fmnist(split, FMNIST_DIR, n)
        source_index = shuffled(list(range(n)), 0)   # sample_id -> position in the IDX file
        for s in iter_samples(m):
            i = source_index[s.sample_id]
            assert s.key == f"fmnist_{split}_{i:06d}" and s.ext == "png"
            assert s.label == labels[i]
            rgb = np.asarray(decode_image(s))
            assert rgb.shape == (28, 28, 3)
            assert (rgb == images[i][..., None]).all(), f"pixels differ for {s.key}"


def test_killed_make_shards_leaves_no_half_written_split(tmp_path, make_imagefolder):
    """SIGKILL mid-run: no split folder appears; the re-run removes the partial one and completes,
    byte-identical to an uninterrupted run."""
    import signal
    import time

    make_imagefolder(tmp_path / "src" / "train", per_class=300)   # ~110 shards: seconds of work
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.make_shards", "imagefolder", "--root", str(tmp_path / "src"),
           "--out", str(out), "--shard-size", "8", "--keep-order"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(".train.partial-*/train-000006.tar")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(out.glob(".train.partial-*/train-000006.tar")), "make_shards did not get going"
        assert proc.poll() is None, "make_shards finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not (out / "train").exists()               # nothing half-written under the real name
    assert list(out.glob(".train.partial-*"))         # (the killed run's partial folder)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not list(out.glob(".train.partial-*"))     # the killed run's leftovers are gone
    clean = tmp_path / "clean"
    make_shards_main(["imagefolder", "--root", str(tmp_path / "src"), "--out", str(clean), "--shard-size", "8",
                      "--keep-order"])
    assert load_manifest(out / "train").sha256 == load_manifest(clean / "train").sha256
    verify_manifest(load_manifest(out / "train"))


def test_failed_split_leaves_nothing_and_rerun_completes(tmp_path, make_imagefolder):
    src = make_imagefolder(tmp_path / "src" / "train")
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    args = ["imagefolder", "--root", str(tmp_path / "src"), "--out", str(out), "--shard-size", "5"]
    with pytest.raises(SampleError, match="broken.jpg"):
        make_shards_main(args)
    assert not (out / "train").exists() and not list(out.glob(".train.partial-*"))
    (src / "dog" / "broken.jpg").unlink()
    make_shards_main(args)                            # "already holds shards" no longer blocks the re-run
    assert load_manifest(out / "train").num_samples == 12
