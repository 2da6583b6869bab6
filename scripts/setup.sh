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
# Real data for tests and the demo: Debian's Fashion-MNIST IDX files.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  ($SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "setup: could not apt-get install dataset-fashion-mnist; Fashion-MNIST tests will skip" >&2
fi
