"""Ray token authentication as configs/teacher_cache.yaml sets it up.

The cluster file's own head command (its env assignments and ``ray start --head`` flags) is run
here on 127.0.0.1, in a temporary folder, with the session's token (conftest: a temp file named by
RAY_AUTH_TOKEN_PATH, where a real node has ~/.ray/auth_token). kdcache's caching job joins it with
the token and completes; a client without the token and the job with a wrong token are refused.
The head is stopped in ``finally`` (SIGTERM to its ``ray start --block``, then its process group).
Also: the suite's own jobs never join a ``ray start`` cluster that runs on the machine.
"""
from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = REPO / "configs" / "teacher_cache.yaml"
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
CLIENT = "import ray, sys; ray.init(address=sys.argv[1]); print('connected', ray.cluster_resources())"


def _split_env(command: str) -> tuple[dict[str, str], list[str]]:
    """``A=1 B=2 ray start ...`` -> ({A: 1, B: 2}, [ray, start, ...])."""
    words, env = shlex.split(command), {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def test_cluster_file_starts_every_node_with_token_auth_and_syncs_the_token():
    text = CLUSTER_FILE.read_text()
    cfg = yaml.safe_load(text)
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert starts and all(_split_env(c)[0].get("RAY_AUTH_MODE") == "token" for c in starts), starts
    assert all(_split_env(c)[1][:2] == ["ray", "start"] for c in starts)
    # the token travels as a file from where `ray up` runs to Ray's default path on every node
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=disabled" not in text and "RAY_AUTH_TOKEN=" not in text


def test_suite_jobs_start_a_fresh_local_ray_even_beside_a_ray_start_cluster(tmp_path, monkeypatch):
    """conftest's RAY_ADDRESS=local (inherited by every subprocess: ``python -m teacher.cache``,
    the demo, the README commands) beats the cluster a ``ray start`` on this machine records,
    which a bare ``ray.init()`` / ``connect_ray(None)`` would otherwise join."""
    from ray._private import services

    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:6379")   # what `ray start --head` leaves
    assert os.environ.get("RAY_ADDRESS") == "local"
    assert services.canonicalize_bootstrap_address(None, str(tmp_path)) is None   # None: start a new one
    monkeypatch.delenv("RAY_ADDRESS")
    assert services.canonicalize_bootstrap_address(None, str(tmp_path)).endswith(":6379")   # would join it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head(port: int, temp_dir: str) -> tuple[dict[str, str], list[str]]:
    """The cluster file's head command, run here: its auth env and flags, plus a free port,
    127.0.0.1, a temp dir, one CPU and --block (this test owns the processes); its autoscaler
    config exists only on a launched head."""
    env, words = _split_env(yaml.safe_load(CLUSTER_FILE.read_text())["head_start_ray_commands"][0])
    assert words[:3] == ["ray", "start", "--head"], words
    flags = [w for w in words[3:] if not w.startswith(("--port=", "--autoscaling-config="))]
    ray = str(Path(sys.executable).parent / "ray")
    return env, [ray, "start", "--head", *flags, f"--port={port}", "--node-ip-address=127.0.0.1",
                 f"--temp-dir={temp_dir}", "--num-cpus=1", "--block"]


def _wait_started(log: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"ray start --head did not come up:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to ``ray start --block`` (it stops what it started), then its whole group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): only its processes
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.mark.slow
def test_token_cluster_refuses_clients_without_the_token_and_runs_the_job(tmp_path):
    if not os.path.exists(FMNIST):
        pytest.skip("Fashion-MNIST IDX files not found (Debian package fashion-mnist)")
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    assert token_path and Path(token_path).is_file(), "conftest sets a session token (never ~/.ray)"
    inputs = tmp_path / "inputs"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_cache_inputs.py"), str(inputs)],
                   check=True, capture_output=True, cwd=REPO)

    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="kdray_", dir="/tmp")  # short: Ray's socket paths must fit
    file_env, cmd = _head(port, temp_dir)
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    authed = {**base, **file_env, "PYTHONPATH": str(REPO)}
    no_token = {k: v for k, v in authed.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    wrong_token = {**authed, "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # RAY_AUTH_TOKEN wins over the file
    address = f"127.0.0.1:{port}"
    job = [sys.executable, "-m", "teacher.cache", "--config", str(inputs / "tiny.yaml"), "--no-progress",
           "--ray-address", address]
    log = tmp_path / "head.log"
    runs: dict[str, subprocess.Popen] = {}
    head = subprocess.Popen(cmd, env=authed, cwd=tmp_path, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_started(log, head)
        # at once, the three of them: ~20 s of a refused client's connection attempts overlap the job
        for name, argv, env in (("job", job, authed),
                                ("client without a token", [sys.executable, "-c", CLIENT, address], no_token),
                                ("job with a wrong token", job + [f"out={tmp_path / 'other.zarr'}"], wrong_token)):
            runs[name] = subprocess.Popen(argv, env=env, cwd=REPO, stdout=open(tmp_path / f"{name}.out", "w"),
                                          stderr=open(tmp_path / f"{name}.err", "w"), text=True)
        out = {name: (p.wait(400), (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text())
               for name, p in runs.items()}
        # the GCS refused the tokenless client for its missing token (not for some other reason)
        gcs_log = "".join(p.read_text(errors="replace") for p in Path(temp_dir).glob("session_*/logs/gcs_server.out"))
    finally:
        for p in runs.values():
            if p.poll() is None:
                p.kill()
        _stop(head)
        left = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes of the test cluster left running: {left}"
    rc, stdout, stderr = out["job"]
    assert rc == 0, f"the job with the token failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    assert "done" in stdout and (inputs / "cache.zarr" / "summary.json").is_file()
    for name in ("client without a token", "job with a wrong token"):
        rc, stdout, stderr = out[name]
        assert rc != 0 and "connected" not in stdout, f"{name} was let in:\n{stdout[-2000:]}\n{stderr[-2000:]}"
        assert "Failed to connect to Ray cluster" in stderr or "uthentication" in stderr, stderr[-2000:]
    assert not (tmp_path / "other.zarr" / "summary.json").exists()
    assert "Missing authorization header" in gcs_log
