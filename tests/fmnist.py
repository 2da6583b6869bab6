"""Where the tests find Fashion-MNIST, and what they do when it is not there: fail.

The end-to-end tests train and cache on Fashion-MNIST's IDX files (Debian's
``dataset-fashion-mnist``, which ``scripts/setup.sh`` installs and fails without). A suite
that skipped them would be green having checked little, so a missing dataset fails every test
that needs it, naming the folder. Two environment variables:

* ``KDCACHE_FMNIST_DIR``: the folder of the ``*-ubyte.gz`` files (default Debian's). Pointing
  it at an empty folder is how one checks that the suite fails without the data.
* ``KDCACHE_ALLOW_MISSING_DATA=1``: skip those tests instead, for a machine that cannot have
  the data. Refused under CI (``CI`` set to true/1/yes, as CI services do): there, a missing
  dataset is a broken setup and must fail.
"""
from __future__ import annotations

import os

import pytest

FMNIST_DIR = os.environ.get("KDCACHE_FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
FMNIST_FILE = "train-images-idx3-ubyte.gz"


def in_ci() -> bool:
    """True where a CI service runs us (it sets ``CI``, e.g. ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_fmnist() -> str:
    """The Fashion-MNIST folder; fails the calling test when its IDX files are absent
    (skips instead only with ``KDCACHE_ALLOW_MISSING_DATA=1`` outside CI)."""
    path = os.path.join(FMNIST_DIR, FMNIST_FILE)
    if os.path.exists(path):
        return FMNIST_DIR
    what = (f"Fashion-MNIST IDX files not found: {path} is missing (install Debian's dataset-fashion-mnist, "
            f"which scripts/setup.sh does, or set KDCACHE_FMNIST_DIR to their folder)")
    if os.environ.get("KDCACHE_ALLOW_MISSING_DATA") == "1" and not in_ci():
        pytest.skip(f"{what}; skipped: KDCACHE_ALLOW_MISSING_DATA=1")
    suffix = " (CI: KDCACHE_ALLOW_MISSING_DATA is ignored)" if in_ci() else \
        "; set KDCACHE_ALLOW_MISSING_DATA=1 to skip the tests that need it instead"
    pytest.fail(what + suffix, pytrace=False)
