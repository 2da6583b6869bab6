#!/usr/bin/env bash
# End-to-end check of the cluster path on THIS machine:
#   sshd on 127.0.0.1 (key auth) -> ray up configs/teacher_cache.yaml -> ray submit pipeline/cache.py
#   -> the cache is complete -> ray down -> no Ray process of this cluster is left.
# Usage (as root, from anywhere): bash scripts/ray_submit_check.sh   (~1-2 min on 2 cores)
# Exit 0 = pass, 1 = fail, 77 = sshd cannot be installed/started here (the test skips on 77).
# Side effects (idempotent): installs openssh-server/rsync if missing, starts sshd, creates
# ~/.ssh/kdcache_ray(.pub) + authorized_keys entry, and, while it runs, a marked block in
# ~/.bashrc that activates the project venv (Ray runs remote commands through `bash --login -i`;
# the block is removed again on exit). The test suite runs it only with KDCACHE_CLUSTER_CHECK=1.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KDCACHE_VENV:-$root/.venv}
work=${KDCACHE_RAY_CHECK_DIR:-$(mktemp -d /tmp/kdcache_ray_check.XXXXXX)}
export RAY_AUTH_MODE=disabled
# shellcheck disable=SC1091
. "$venv/bin/activate"
log() { echo "[ray_submit_check] $*" >&2; }
skip() { log "SKIP: $*"; exit 77; }

# ---------------------------------------------------------------- sshd on 127.0.0.1
export KDCACHE_SSHD_PIDFILE="$work/sshd.pid"   # set only if this check has to start sshd
bash "$root/scripts/sshd_setup.sh" || skip "sshd could not be installed/started (see above)"
key=$HOME/.ssh/kdcache_ray

# ---------------------------------------------------------------- ~/.bashrc activates the venv
marker_begin="# >>> kdcache ray cluster >>>"
marker_end="# <<< kdcache ray cluster <<<"
touch "$HOME/.bashrc"
sed -i "/$marker_begin/,/$marker_end/d" "$HOME/.bashrc"
unmark_bashrc() {
  sed -i "/$marker_begin/,/$marker_end/d" "$HOME/.bashrc"
  # stop the sshd this check started (if it found one running, it leaves it alone)
  [ -f "$KDCACHE_SSHD_PIDFILE" ] && kill "$(cat "$KDCACHE_SSHD_PIDFILE")" 2>/dev/null && rm -f "$KDCACHE_SSHD_PIDFILE"
  return 0
}
trap unmark_bashrc EXIT
cat >> "$HOME/.bashrc" <<RC
$marker_begin
export RAY_AUTH_MODE=disabled
. "$venv/bin/activate"
$marker_end
RC

# ---------------------------------------------------------------- inputs: tiny shards + teacher
log "work dir $work"
python "$root/scripts/make_tiny_cache_inputs.py" "$work"   # writes $work/tiny.yaml

# Derived cluster file: same as configs/teacher_cache.yaml, but the repo is mounted into the
# work dir (not ~/kdcache) and the setup only checks the install: `pip install -e` on this
# machine would re-point the dev venv at the copy.
python - "$root" "$work" "$key" <<'PY'
import sys, yaml
root, work, key = sys.argv[1:]
cfg = yaml.safe_load(open(f"{root}/configs/teacher_cache.yaml"))
cfg["cluster_name"] = "kdcache-check"
cfg["auth"] = {"ssh_user": "root", "ssh_private_key": key}
cfg["file_mounts"] = {f"{work}/repo": root}
cfg["setup_commands"] = [f"python -c 'import pipeline.cache, ray; print(ray.__version__)' && ls {work}/repo/pipeline/cache.py"]
cfg["head_start_ray_commands"] = [c.replace("--port=6379", "--port=6390") for c in cfg["head_start_ray_commands"]]
yaml.safe_dump(cfg, open(f"{work}/cluster.yaml", "w"), sort_keys=False)
PY

ray_pids() { pgrep -f 'raylet|gcs_server|ray/dashboard|default_worker.py|ray::|log_monitor.py|monitor.py --logs-dir' | sort || true; }
before=$(ray_pids)
status=1
cleanup() {
  ray down -y "$work/cluster.yaml" >"$work/down.log" 2>&1 || { log "ray down failed:"; cat "$work/down.log" >&2; }
  unmark_bashrc
}
trap cleanup EXIT

cd "$root"
log "ray up"
ray up -y --no-config-cache "$work/cluster.yaml" >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; log "FAIL: ray up"; exit 1; }
log "ray submit"
ray submit "$work/cluster.yaml" pipeline/cache.py --config "$work/tiny.yaml" --no-progress \
  >"$work/submit.log" 2>&1 || { tail -60 "$work/submit.log" >&2; log "FAIL: ray submit"; exit 1; }
[ -f "$work/cache.zarr/summary.json" ] || { tail -60 "$work/submit.log" >&2; log "FAIL: no summary.json"; exit 1; }
python - "$work" <<'PY'
import sys, yaml
from pipeline.cache import CacheJobConfig
from pipeline.shards import load_manifest
from storage import open_cache
work = sys.argv[1]
cfg = CacheJobConfig.from_dict(yaml.safe_load(open(f"{work}/tiny.yaml")))
m = load_manifest(cfg.shards)
r = open_cache(cfg.out)
todo = [(e, s) for e in range(cfg.epochs) for s in range(len(m.shards)) if not r.is_done(e, s)]
assert not todo, f"items not done after ray submit: {todo}"
print(f"[ray_submit_check] cache {cfg.out}: {cfg.epochs} epochs x {len(m.shards)} shards done")
PY
trap unmark_bashrc EXIT
log "ray down"
cleanup
left=""
for _ in $(seq 20); do
  left=$(comm -13 <(echo "$before") <(ray_pids) | while read -r p; do [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"; done || true)
  [ -z "$left" ] && break
  sleep 1
done
if [ -n "$left" ]; then
  log "FAIL: Ray processes left after ray down:"; for p in $left; do ps -o pid=,args= -p "$p" >&2 || true; done
  exit 1
fi
log "PASS"
