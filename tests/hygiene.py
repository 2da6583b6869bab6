"""A pytest plugin that fails the run when the tests change the machine outside the clone.

The README's test command must leave the machine as it found it: no edits to ``~/.bashrc`` or
``~/.ssh``, no daemon left running. At session start this takes a snapshot of those files and
marks the session's environment (``KDCACHE_TEST_SESSION``, inherited by every process the tests
start, Ray workers and sshd included); at the end it compares the files and looks for processes
that still carry the mark. The sshd-based ``ray up/submit/down`` check changes ``~/.ssh`` by
design: it runs only with ``KDCACHE_CLUSTER_CHECK=1`` (CI sets it), and then the file check is off.

conftest.py imports the two hooks; ``python -m pytest -p hygiene`` loads it anywhere.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

MARK = "KDCACHE_TEST_SESSION"
OPT_IN = "KDCACHE_CLUSTER_CHECK"


def _home_files() -> dict[str, str]:
    """sha256 of ~/.bashrc and of every file under ~/.ssh and ~/.ray (Ray's default token
    file; the tests use their own token) (absent files map to '-')."""
    home = Path(os.path.expanduser("~"))
    paths = [home / ".bashrc", home / ".ray" / "auth_token"]
    for folder in (home / ".ssh", home / ".ray"):
        if folder.is_dir():
            paths += sorted(p for p in folder.rglob("*") if p.is_file() and p not in paths)
    out = {}
    for p in paths:
        try:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            out[str(p)] = "-"
    return out


# Helpers that exit by themselves when this process exits (they watch a pipe to it).
_EXITS_WITH_PARENT = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def marked_processes(mark: str) -> list[str]:
    """'pid cmdline' of live processes (not this one) whose environment carries ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                continue  # exited, waiting to be reaped: not running
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(helper in cmd for helper in _EXITS_WITH_PARENT):
            continue
        found.append(f"{proc.name} {cmd[:160]}")
    return found


def session_processes(sid: int) -> list[str]:
    """'pid cmdline' of live processes (not zombies) in session ``sid``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] == "Z":
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        found.append(f"{proc.name} {cmd[:160]}")
    return found


def wait_session_gone(sid: int, timeout: float = 60.0) -> list[str]:
    """Wait until no process of session ``sid`` runs; returns those still running at ``timeout``.

    A job started with ``start_new_session=True`` and killed with ``killpg`` may leave processes
    behind for a while: Ray's raylet puts each worker (the job's actors) in a process group of its
    own, in the driver's session, and such a worker exits only once it notices its raylet is gone,
    after finishing whatever it was writing.
    """
    deadline = time.time() + timeout
    left = session_processes(sid)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = session_processes(sid)
    return left


def pytest_sessionstart(session) -> None:
    # a fresh mark per session: a pytest run inside a test only answers for its own processes
    previous, mark = os.environ.get(MARK), uuid.uuid4().hex
    os.environ[MARK] = mark
    session.config._kdcache_hygiene = (_home_files(), mark, previous)


def pytest_sessionfinish(session, exitstatus) -> None:
    state = getattr(session.config, "_kdcache_hygiene", None)
    if state is None:
        return
    before, mark, previous = state
    if previous is None:
        os.environ.pop(MARK, None)
    else:
        os.environ[MARK] = previous
    problems = []
    if os.environ.get(OPT_IN) != "1":
        after = _home_files()
        problems += [f"changed {p}" for p in sorted(set(before) | set(after)) if before.get(p) != after.get(p)]
    left: list[str] = []
    for _ in range(20):  # processes being shut down (Ray, DataLoader workers) get a few seconds
        left = marked_processes(mark)
        if not left:
            break
        time.sleep(0.5)
    problems += [f"process left running: {p}" for p in left]
    if problems:
        print("\nhygiene: the tests changed the machine outside the clone:\n  " + "\n  ".join(problems))
        session.exitstatus = 1
