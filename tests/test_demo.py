"""The end-to-end demo in its quick form, then the README's Usage commands as a user runs them.

A user's checkout is simulated in tmp_path (``configs/`` of this repository, the quick demo's
outputs in ``runs/demo``). The demo runs every step as the README's command does (shards,
teacher, Ray cache + audit, students from the one cache, tables); then every command of the
README's ``usage-test`` blocks runs there as written (the README is their only source). The
quick slice is small, so accuracy is not checked, only the flow and what the commands say.
~10-15 min on 2 idle CPU cores: marked ``slow``; CI runs it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist import require_fmnist
from test_readme import usage_commands

REPO = Path(__file__).resolve().parents[1]
KEYS = ("teacher", "none", "soft", "hard_token", "hard_token_online", "second_arch")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _needs_fmnist():
    """The demo reads Fashion-MNIST from its own default folder (scripts/demo.py)."""
    require_fmnist()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KDCACHE_DEBUG"}
    # `python` in the README's commands is this interpreter; the package is this checkout
    env.update(PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(the user's working directory, the demo's process) after a quick demo into runs/demo."""
    work = tmp_path_factory.mktemp("user")
    (work / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--config", "configs/demo/quick.yaml",
                           "--out", str(work / "runs" / "demo")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


def test_quick_demo(quick_demo):
    work, proc = quick_demo
    out = work / "runs" / "demo"
    results = json.loads((out / "results.json").read_text())
    for key in KEYS:
        assert 0.0 <= results["top1"][key] <= 100.0, key
    # even three epochs on 600 images beat chance (10 classes) for the teacher (35.5 % when written)
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
    for word in ("Table 3", "Table 4", "Cost", "hard distillation", "5 student runs (5 recipes)"):
        assert word in md, word
    assert "(1 seed)" in md and "± 0.00" not in md          # one seed shows no spread
    assert (out / "comparison.png").stat().st_size > 0
    for rec in results["runs"].values():
        for seed in rec["seeds"]:
            run_dir = Path(seed["run_dir"])
            assert (run_dir / "curves.png").exists()
            # run.keep_last=1 plus best.pt (the same file when the last epoch is the best)
            assert {p.name for p in run_dir.glob("*.pt")} <= {"checkpoint-000002.pt", "best.pt"}
    assert (out / "teacher" / "teacher.pt").exists() and (out / "cache.zarr").is_dir()

    # the console shows every stage's progress while it runs, then the next commands
    console = proc.stdout
    for line in ("[demo]   teacher: epoch 1/3: loss", "[demo]   cache: cache ", "items done",
                 "[demo]   student-hard_token-s0: epoch 2/2: loss", "[demo] next steps",
                 f"cache.path={out / 'cache.zarr'}"):
        assert line in console, (line, console[-3000:])


def test_readme_usage_commands_run_as_written(quick_demo):
    work, _ = quick_demo
    outputs = {}
    for cmd in usage_commands():
        proc = subprocess.run(["bash", "-c", cmd], cwd=work, env=_env(), capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, f"README command failed: {cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs[cmd] = proc.stdout
    by_start = lambda text: [o for c, o in outputs.items() if c.startswith(text)]   # noqa: E731
    caching = by_start("python -m teacher.cache --config configs/cache/fmnist_regnety002.yaml")
    assert re.search(r"(\d+)/\1 items done \(", caching[0]) and re.search(r"(\d+)/\1 items done, nothing to run$",
                                                                          caching[1].strip()), caching
    resumed = by_start("python -m student.train --config configs/student/fmnist_hard.yaml --resume")
    assert "6/6 epochs done, nothing to run" in resumed[0]
    for run in ("runs/student/fmnist_hard", "runs/student/fmnist_soft_tau3", "runs/student/fmnist_online",
                "runs/student/fmnist_resnet10t", "runs/student/fmnist_hard_ra"):
        pts = {p.name for p in (work / run).glob("*.pt")}
        assert {"checkpoint-000005.pt", "checkpoint-000006.pt", "best.pt"} >= pts >= {"checkpoint-000006.pt"}, run
    # help texts that name outputs name the ones the demo and these commands made
    for module in ("teacher.audit", "teacher.cache", "student.train"):
        text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=work, env=_env(), capture_output=True,
                              text=True).stdout
        for ref in re.findall(r"\b(?:runs|configs)/[\w./-]+\.(?:zarr|yaml|pt)\b", text):
            assert (work / ref).exists(), f"{module} --help names {ref}"
