#!/usr/bin/env bash
# ImageNet-shaped rehearsal (see scripts/rehearsal.py): real-photo class tree -> make_shards ->
# Ray cache with a real 1000-class teacher -> the ImageNet student config -> audit, with checks.
#   bash scripts/rehearsal.sh            # full, ~9 min on 2 idle CPU cores -> runs/rehearsal/rehearsal.json
#   bash scripts/rehearsal.sh --quick    # short version, ~3 min (CI runs it in tests/test_rehearsal.py)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
cd "$root"
exec python scripts/rehearsal.py "$@"
