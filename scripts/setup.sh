#!/usr/bin/env bash
# Create or reuse .venv and install kdcache (+dev extras) and the Fashion-MNIST data, only what is missing.
# Usage: source scripts/setup.sh   (or bash scripts/setup.sh)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KDCACHE_VENV:-$root/.venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.kdcache-installed"
# The versions the published figures were made with (scripts/lock.sh); KDCACHE_CONSTRAINTS= (empty)
# installs unpinned, KDCACHE_CONSTRAINTS=FILE with another lock.
constraints=${KDCACHE_CONSTRAINTS-$root/constraints.txt}
if [ -n "$constraints" ]; then
  [ -f "$constraints" ] || { echo "setup: KDCACHE_CONSTRAINTS=$constraints: no such file" >&2; exit 1; }
  lock_py=$(sed -n 's/^# python: *//p' "$constraints" | head -n 1)
  this_py=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ -n "$lock_py" ] && [ "$lock_py" != "$this_py" ]; then
    echo "setup: $constraints locks Python $lock_py, this is $this_py: installing WITHOUT it (figures may" \
         "differ from the published ones; KDCACHE_CONSTRAINTS=FILE uses a lock of your own)" >&2
    constraints=""
  fi
fi
# reinstall when pyproject.toml or the constraints (file or choice) change
want=$(python -c 'import hashlib, sys
print(" ".join(p + ":" + hashlib.sha256(open(p, "rb").read()).hexdigest() if p else "unpinned" for p in sys.argv[1:]))' \
       "$root/pyproject.toml" "$constraints")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q ${constraints:+-c "$constraints"} -e "$root[dev]"
  printf '%s\n' "$want" > "$stamp"
fi
# Real data for the tests and the demo: Debian's Fashion-MNIST IDX files. The tests that need them
# fail without them (tests/fmnist.py), so a setup that cannot install them fails here, saying why.
fmnist_dir=${KDCACHE_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
fmnist_file="$fmnist_dir/train-images-idx3-ubyte.gz"
if [ ! -f "$fmnist_file" ]; then
  why="apt-get is not available on this machine"
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
    if apt_log=$( ($SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist) 2>&1 ); then
      why="apt-get installed dataset-fashion-mnist, but not into $fmnist_dir"
    else
      why="apt-get install dataset-fashion-mnist failed: $(printf '%s\n' "$apt_log" | tail -n 2 | tr '\n' ' ')"
    fi
  fi
  if [ ! -f "$fmnist_file" ]; then
    msg="setup: Fashion-MNIST is missing ($fmnist_file): $why. The tests and the demo need it: install Debian's dataset-fashion-mnist, or set KDCACHE_FMNIST_DIR to a folder holding the *-ubyte.gz files"
    case "${CI:-}" in true|TRUE|True|1|yes) ci=1 ;; *) ci=0 ;; esac
    if [ "${KDCACHE_ALLOW_MISSING_DATA:-}" = 1 ] && [ "$ci" = 0 ]; then
      echo "$msg. Continuing: KDCACHE_ALLOW_MISSING_DATA=1 (the tests that need it will skip)" >&2
    else
      echo "$msg." >&2
      return 1 2>/dev/null || exit 1   # sourced: leave the caller's shell open
    fi
  fi
fi
