"""constraints.txt, the lock scripts/setup.sh installs with, covers what kdcache depends on.

A dependency added to pyproject.toml without a pin would be resolved afresh on every clean
clone, and the published figures would stop being reproducible (issue 17).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    """PEP 503 normalized project name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^=\s;]+", line), f"constraints.txt: not a pin: {line!r}"
            name, version = line.split("==")
            out[_name(name)] = version
    return out


def test_every_dependency_is_pinned_and_kdcache_is_not():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    locked = pins()
    assert not wanted - set(locked), f"constraints.txt lacks pins for {sorted(wanted - set(locked))}: run scripts/lock.sh"
    assert "kdcache" not in locked  # the package itself is installed from the clone, never pinned


def test_lock_names_its_python():
    header = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("# python:")]
    assert len(header) == 1 and re.fullmatch(r"# python: 3\.\d+", header[0]), header  # scripts/setup.sh reads it
