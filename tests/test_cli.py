"""The four CLIs as a user meets them: a user error is one line (+ hint) and exit 2, no traceback;
``--debug`` / ``KDCACHE_DEBUG=1`` bring the traceback back; bugs keep theirs; ``--help`` names
files that exist and ``student.train --help`` lists the config sections.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import run_cli
from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "KDCACHE_DEBUG"}
    full_env.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([PY, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"python -m {prog}: error: "), lines
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("  hint: ")), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_student_train_user_errors(fmnist_shards, tmp_path):
    config = "configs/student/fmnist_hard.yaml"
    data = [f"data.train={fmnist_shards / 'train'}", f"data.val={fmnist_shards / 'val'}"]
    proc = run("student.train", "--config", config, "optim.lr=fast")
    assert_one_line_error(proc, "student.train", "optim.lr", "expected a number")
    assert "--help lists the config sections" in proc.stderr          # the hint
    assert_one_line_error(run("student.train", "--config", config, "optim.lrr=1e-3"),
                          "student.train", "unknown config key optim.lrr")
    assert_one_line_error(run("student.train", "--config", config, *data, "cache.wait=false",
                              f"cache.path={tmp_path / 'absent.zarr'}"),
                          "student.train", "no kdcache cache at", "absent.zarr")
    assert_one_line_error(run("student.train", "--config", config, f"data.train={tmp_path / 'nowhere'}"),
                          "student.train", "no manifest at", "nowhere")
    assert_one_line_error(run("student.train", "--config", str(tmp_path / "missing.yaml")),
                          "student.train", "missing.yaml does not exist")


def test_cache_audit_make_shards_user_errors(fmnist_shards, tmp_path):
    assert_one_line_error(run("teacher.cache", "--config", "configs/cache/fmnist_regnety002.yaml", "epoch=3"),
                          "teacher.cache", "unknown config key epoch")
    assert_one_line_error(run("teacher.cache", "--config", "configs/cache/fmnist_regnety002.yaml",
                              f"shards={tmp_path / 'nope'}"), "teacher.cache", "no manifest at")
    assert_one_line_error(run("teacher.audit", str(tmp_path / "absent.zarr")),
                          "teacher.audit", "no kdcache cache at")
    assert_one_line_error(run("pipeline.make_shards", "fmnist", "--out", str(fmnist_shards), "--limit-train", "8"),
                          "pipeline.make_shards", "already holds a complete split")


def test_debug_shows_the_traceback(tmp_path):
    for args, env in ((["--debug"], None), ([], {"KDCACHE_DEBUG": "1"})):
        proc = run("teacher.audit", str(tmp_path / "absent.zarr"), *args, env=env)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "no kdcache cache at" in proc.stderr


def test_run_cli_keeps_bugs_loud(capsys):
    def bug(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_cli(bug, "prog", [])

    def user(argv):
        raise ConfigError("loss.tau: must be positive")

    assert run_cli(user, "prog", [], hints={"ConfigError": "see --help"}) == 2
    assert capsys.readouterr().err == "prog: error: loss.tau: must be positive\n  hint: see --help\n"
    assert run_cli(lambda argv: None, "prog", []) == 0


FILE_REF = re.compile(r"\b((?:configs|pipeline|student|teacher|storage|scripts)/[\w./-]+\.(?:yaml|py))\b")


@pytest.mark.parametrize("module", ["student.train", "teacher.cache", "teacher.audit", "pipeline.make_shards"])
def test_help_names_files_that_exist(module):
    proc = run(module, "--help")
    assert proc.returncode == 0, proc.stderr
    refs = set(FILE_REF.findall(proc.stdout))
    if module in ("student.train", "teacher.cache"):   # the others name runs/ outputs (tests/test_demo.py)
        assert refs, proc.stdout
    for ref in refs:
        assert (REPO / ref).exists(), f"{module} --help names {ref}, which does not exist"
    if module == "student.train":
        for section in ("model", "data", "cache", "teacher", "loss", "optim", "run"):
            assert re.search(rf"^  {section} +\S", proc.stdout, re.M), section
        assert "student/config.py" in proc.stdout and "keys: mode alpha tau" in proc.stdout
