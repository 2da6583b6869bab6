"""Where a benchmark figure came from: the commit, the machine and the package versions.

Every ``bench/results/*.json`` carries ``"provenance": provenance()``, so a figure can be traced to
the code that produced it (a dirty worktree says so and lists the changed files) and to the
versions it ran on (``constraints.txt`` pins the ones the README's figures came from).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The packages whose versions change the figures (image decode/augment, model, storage, Ray).
PACKAGES = ("torch", "torchvision", "timm", "zarr", "numcodecs", "ray", "webdataset", "numpy", "pillow")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """The commit this checkout is at, its branch, and the tracked files changed since it."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if dirty is None else bool(dirty),
            "changed_files": None if not dirty else [line.split(maxsplit=1)[1] for line in dirty.splitlines()]}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model and cores, memory, platform, load average now (the machine may be shared)."""
    info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "machine": platform.machine()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def versions(packages=PACKAGES) -> dict:
    """Installed versions (``None``: not installed), Python's and the constraints file in force."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:  # torch's own string carries the build (e.g. +cu130 or +cpu), the registry's does not
        import torch

        out["torch_build"] = torch.__version__
    except ImportError:
        pass
    return out


def constraints_match() -> dict | None:
    """How the installed versions compare with ``constraints.txt`` (the lock of the README's
    figures): the pinned packages whose installed version differs. None without the file."""
    path = ROOT / "constraints.txt"
    if not path.exists():
        return None
    differ = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, want = (s.strip() for s in line.split("==", 1))
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a platform's package (CUDA wheels on a Mac): not installed, nothing to compare
        if have != want:
            differ[name] = {"installed": have, "constraints": want}
    return {"file": "constraints.txt", "differs": differ}


_AT_IMPORT = git_state()  # bench scripts import this module as they start


def provenance() -> dict:
    """Commit (as the run started; ``git_at_end`` too if the checkout changed since), machine,
    versions and the command line, for a results JSON."""
    argv0 = Path(sys.argv[0])
    script = str(argv0.resolve().relative_to(ROOT)) if argv0.resolve().is_relative_to(ROOT) else str(argv0)
    now = git_state()
    return {"command": " ".join(["python", script, *sys.argv[1:]]), "git": _AT_IMPORT,
            **({"git_at_end": now} if now != _AT_IMPORT else {}), "machine": machine(), "versions": versions(), "constraints": constraints_match()}
