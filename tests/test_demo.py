"""The end-to-end demo in its quick form (``scripts/demo.py --config configs/demo/quick.yaml``).

Runs every step as the README's command does (shards, teacher, Ray cache + audit, students from
the one cache, tables) into tmp_path and checks what it writes. ~5 min on 2 CPU cores: marked
``slow``; CI runs it. Accuracy is not checked (the quick slice is too small), only the flow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
KEYS = ("teacher", "none", "soft", "hard_token", "hard_token_online", "second_arch")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FMNIST), reason="Fashion-MNIST IDX files not installed")
def test_quick_demo(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--config", "configs/demo/quick.yaml", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    for key in KEYS:
        assert 0.0 <= results["top1"][key] <= 100.0, key
    # even two epochs on 1.5k images beat chance (10 classes) for the teacher
    assert results["top1"]["teacher"] > 20.0
    assert results["demo_seconds"] > 0
    # the teacher weights exported for the cache load through teacher/model.py and score the same
    assert abs(results["teacher_eval_top1"] - results["top1"]["teacher"]) < 0.5
    # audit: fp32 CPU re-scoring agrees with the cache
    for epoch, row in results["audit"].items():
        assert row["top1_agree"] == 1.0, (epoch, row)
    hard = results["runs"]["hard_token"]["summary"]
    assert {"val_top1_cls", "val_top1_dist", "val_top1_fused"} <= set(hard)
    t4 = results["table4"]
    assert t4["ground truth"]["ground truth"] == 0.0
    assert all(0.0 <= v <= 100.0 for row in t4.values() for v in row.values())
    cost = results["cost"]
    assert cost["total_cached"] > cost["cache_seconds"] > 0 and cost["total_online"] > 0

    md = (out / "results.md").read_text()
    for word in ("Table 3", "Table 4", "Cost", "hard distillation"):
        assert word in md
    assert (out / "comparison.png").stat().st_size > 0
    for rec in results["runs"].values():
        for seed in rec["seeds"]:
            assert (Path(seed["run_dir"]) / "curves.png").exists()
    assert (out / "teacher" / "teacher.pt").exists() and (out / "cache.zarr").is_dir()
