#!/usr/bin/env bash
# The kdcache end-to-end demo on Fashion-MNIST (CPU): shards -> teacher -> Ray cache + audit ->
# students from the one cache -> DeiT-style tables in runs/demo/results.md.
#   bash scripts/demo.sh                 # full run, ~19 min on 2 CPU cores (configs/demo/full.yaml)
#   bash scripts/demo.sh --quick         # flow check, ~2.5 min (configs/demo/quick.yaml -> runs/demo-quick)
#   bash scripts/demo.sh [--quick] [--out DIR] [demo-config overrides, e.g. limit_train=5000]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
cd "$root"
config=configs/demo/full.yaml
if [ "${1:-}" = "--quick" ]; then
  config=configs/demo/quick.yaml
  shift
fi
exec python scripts/demo.py --config "$config" "$@"
