#!/usr/bin/env bash
# Write constraints.txt: the exact versions of the active venv (the one the README's and
# BENCHMARKS.md's figures were made with). scripts/setup.sh installs with it.
# Usage: . /path/to/.venv/bin/activate && bash scripts/lock.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/constraints.txt}
{
  echo "# The versions kdcache's published figures were made with (pip freeze of that venv, by scripts/lock.sh)."
  echo "# scripts/setup.sh installs with it: pip install -c constraints.txt -e .[dev]."
  echo "# KDCACHE_CONSTRAINTS= (empty) installs unpinned, KDCACHE_CONSTRAINTS=FILE with another lock."
  echo "# Made on $(python -c 'import platform; print(platform.system(), platform.machine())');"\
       "the CUDA wheels (nvidia-*, cuda-*, triton) are the ones this torch requires on Linux and"
  echo "# are not installed elsewhere (a constraint only pins what is installed)."
  echo "# python: $(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  python -m pip freeze --exclude-editable | grep -viE '^(kdcache)([=@ ]|$)|^-e |^# Editable'
} > "$out"
echo "wrote $out ($(grep -vc '^#' "$out") pins)"
