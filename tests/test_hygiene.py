"""The test command leaves the machine alone: the hygiene plugin catches edits to ~/.bashrc or
~/.ssh and processes left running, and the sshd/``ray up`` check is opt-in; a run without the
Fashion-MNIST data fails instead of skipping the end-to-end tests (tests/fmnist.py)."""
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


def _run_without_fmnist(tmp_path: Path, nodes: list[str], **env) -> subprocess.CompletedProcess:
    """The given tests with KDCACHE_FMNIST_DIR pointed at an empty folder (the data 'missing')."""
    empty = tmp_path / "no-fmnist"
    empty.mkdir(exist_ok=True)
    drop = ("CI", "KDCACHE_ALLOW_MISSING_DATA", "KDCACHE_FMNIST_DIR", "KDCACHE_TEST_SESSION")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    environ.update(KDCACHE_FMNIST_DIR=str(empty), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *nodes],
                          cwd=TESTS.parent, env=environ, capture_output=True, text=True, timeout=300)


def test_missing_fmnist_fails_the_run_in_ci(tmp_path):
    """Without the data the end-to-end tests fail (fixture and direct users), naming the file;
    the opt-out to skip works only outside CI."""
    fixture_user = "tests/test_shards.py::test_fmnist_slice_matches_idx"
    r = _run_without_fmnist(tmp_path, [fixture_user, "tests/test_train.py::test_short_fmnist_run_learns"], CI="true")
    missing = str(tmp_path / "no-fmnist" / "train-images-idx3-ubyte.gz")
    assert r.returncode == 1, r.stdout[-3000:]
    assert "1 failed, 1 error" in r.stdout and r.stdout.count(missing) >= 2, r.stdout[-3000:]
    r = _run_without_fmnist(tmp_path, [fixture_user], CI="true", KDCACHE_ALLOW_MISSING_DATA="1")
    assert r.returncode == 1 and "KDCACHE_ALLOW_MISSING_DATA is ignored" in r.stdout, r.stdout[-3000:]
    r = _run_without_fmnist(tmp_path, [fixture_user])
    assert r.returncode == 1 and "set KDCACHE_ALLOW_MISSING_DATA=1" in r.stdout, r.stdout[-3000:]
    r = _run_without_fmnist(tmp_path, [fixture_user], KDCACHE_ALLOW_MISSING_DATA="1")
    assert r.returncode == 0 and "1 skipped" in r.stdout and missing in r.stdout, r.stdout[-3000:]


def _run_setup(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """scripts/setup.sh against a stand-in venv (already installed: nothing to pip) with apt-get and
    sudo stubbed (apt-get fails, as without root or network; it logs its calls): the machine's
    own packages and venv stay untouched."""
    venv, stubs = tmp_path / "venv", tmp_path / "stubs"
    (venv / "bin").mkdir(parents=True)
    stubs.mkdir()
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "activate").write_text("")
    (venv / ".kdcache-installed").touch()
    calls = tmp_path / "apt-calls"
    for name, body in (("apt-get", f'echo "$*" >> {calls}\n[ "$1" = update ] && exit 0\necho "E: Unable to locate package dataset-fashion-mnist" >&2\nexit 100'),
                       ("sudo", '[ "$1" = -n ] && shift\nexec "$@"')):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    drop = ("CI", "KDCACHE_ALLOW_MISSING_DATA", "KDCACHE_FMNIST_DIR")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    environ.update(KDCACHE_VENV=str(venv), PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["bash", str(TESTS.parent / "scripts" / "setup.sh")], env=environ,
                          capture_output=True, text=True, timeout=120)


def test_setup_fails_loudly_without_fmnist(tmp_path):
    """setup.sh exits non-zero, naming the file and apt's error, when it cannot install the data the
    test command needs; KDCACHE_ALLOW_MISSING_DATA=1 lets it go on outside CI only."""
    empty = tmp_path / "no-fmnist"
    empty.mkdir()
    r = _run_setup(tmp_path, KDCACHE_FMNIST_DIR=str(empty), CI="true")
    assert r.returncode != 0, r.stderr
    assert f"Fashion-MNIST is missing ({empty}/train-images-idx3-ubyte.gz)" in r.stderr, r.stderr
    assert "apt-get install dataset-fashion-mnist failed: E: Unable to locate package" in r.stderr, r.stderr
    assert "install -y -q dataset-fashion-mnist" in (tmp_path / "apt-calls").read_text()
    r = _run_setup(tmp_path / "a", KDCACHE_FMNIST_DIR=str(empty), CI="true", KDCACHE_ALLOW_MISSING_DATA="1")
    assert r.returncode != 0, r.stderr
    r = _run_setup(tmp_path / "b", KDCACHE_FMNIST_DIR=str(empty), KDCACHE_ALLOW_MISSING_DATA="1")
    assert r.returncode == 0 and "Continuing: KDCACHE_ALLOW_MISSING_DATA=1" in r.stderr, r.stderr
    if os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):  # installed: no apt
        r = _run_setup(tmp_path / "c", CI="true")
        assert r.returncode == 0 and not (tmp_path / "c" / "apt-calls").exists(), r.stderr
