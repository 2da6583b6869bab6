"""The test command leaves the machine alone: the hygiene plugin catches edits to ~/.bashrc or
~/.ssh and processes left running, and the sshd/``ray up`` check is opt-in."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

LEAKY = '''
import os, subprocess
def test_writes_bashrc():
    with open(os.path.expanduser("~/.bashrc"), "a") as f:
        f.write("export LEAKED=1\\n")
def test_starts_a_daemon():
    subprocess.Popen(["sleep", "120"], start_new_session=True)
'''

CLEAN = '''
import subprocess
def test_cleans_up():
    p = subprocess.Popen(["sleep", "120"])
    p.kill(); p.wait()
'''


def _run(tmp_path: Path, body: str, **env) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".bashrc").write_text("# user's\n")
    test = tmp_path / "test_inner.py"
    test.write_text(body)
    environ = {k: v for k, v in os.environ.items() if k not in ("KDCACHE_TEST_SESSION", "KDCACHE_CLUSTER_CHECK")}
    environ.update(HOME=str(home), PYTHONPATH=str(TESTS), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "hygiene", "-p", "no:cacheprovider",
                           str(test)], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)


def test_plugin_fails_a_run_that_edits_bashrc_or_leaves_a_daemon(tmp_path):
    r = _run(tmp_path, LEAKY)
    try:
        assert r.returncode != 0, r.stdout
        assert "changed " + str(tmp_path / "home" / ".bashrc") in r.stdout
        assert "process left running" in r.stdout and "sleep 120" in r.stdout
    finally:
        subprocess.run(["pkill", "-f", "^sleep 120$"], check=False)


def test_plugin_passes_a_clean_run(tmp_path):
    r = _run(tmp_path, CLEAN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hygiene" not in r.stdout


def test_cluster_check_is_opt_in(tmp_path):
    """Without KDCACHE_CLUSTER_CHECK=1 the sshd/ray-up test is skipped, naming the switch."""
    environ = {k: v for k, v in os.environ.items() if k != "KDCACHE_CLUSTER_CHECK"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(TESTS / "test_ray_submit.py")], cwd=TESTS.parent, env=environ,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 skipped" in r.stdout and "KDCACHE_CLUSTER_CHECK=1" in r.stdout, r.stdout
