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
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e "$root[dev]"
  touch "$stamp"
fi
# Real data for tests and the demo: Debian's Fashion-MNIST IDX files.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  ($SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "setup: could not apt-get install dataset-fashion-mnist; Fashion-MNIST tests will skip" >&2
fi
