#!/usr/bin/env bash
# End-to-end check of the cluster path on THIS machine:
#   sshd on 127.0.0.1 (key auth) -> ray up configs/teacher_cache.yaml -> ray submit teacher/cache.py
#   -> the cache is complete -> ray down -> no Ray process of this cluster is left.
# Usage (as root, from anywhere): bash scripts/ray_submit_check.sh   (~1-2 min on 2 cores)
# Exit 0 = pass, 1 = fail, 77 = sshd cannot be installed/started here (the test skips on 77).
# Side effects: installs openssh-server/rsync if missing; while it runs: sshd (stopped on exit if
# this check started it), ~/.ssh/kdcache_ray(.pub) and its authorized_keys entry (removed on exit
# unless they were there before), and a marked block in ~/.bashrc that activates the project venv
# (Ray runs remote commands through `bash --login -i`; the block is removed on exit).
# Ray auth: the cluster runs with the cluster file's RAY_AUTH_MODE=token; the token is made for
# this check in the work dir and mounted to WORK/node/auth_token (the "node" is this machine, so
# not to ~/.ray/auth_token as on real nodes); after the job, an unauthenticated client must be
# refused. The test suite runs it only with KDCACHE_CLUSTER_CHECK=1.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${KDCACHE_VENV:-$root/.venv}
work=${KDCACHE_RAY_CHECK_DIR:-$(mktemp -d /tmp/kdcache_ray_check.XXXXXX)}
# shellcheck disable=SC1091
. "$venv/bin/activate"
# This machine plays the one who runs `ray up`: its token file (RAY_AUTH_TOKEN_PATH, not ~/.ray)
unset RAY_ADDRESS RAY_AUTH_TOKEN
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$work/ray_auth_token")
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$work/ray_auth_token
node_token=$work/node/auth_token
log() { echo "[ray_submit_check] $*" >&2; }
skip() { log "SKIP: $*"; exit 77; }

# ---------------------------------------------------------------- sshd on 127.0.0.1
export KDCACHE_SSHD_PIDFILE="$work/sshd.pid"   # set only if this check has to start sshd
key=$HOME/.ssh/kdcache_ray
had_key=0; [ -f "$key" ] && had_key=1
had_entry=0
[ "$had_key" = 1 ] && grep -qF "$(cut -d' ' -f2 "$key.pub")" "$HOME/.ssh/authorized_keys" 2>/dev/null && had_entry=1
# Root login with the check's key must not outlive the check: its authorized_keys line (and the
# key, if this check made it) go again on exit, unless they were there before.
unauthorize_key() {
  if [ "$had_entry" = 0 ] && [ -f "$key.pub" ] && [ -f "$HOME/.ssh/authorized_keys" ]; then
    body=$(cut -d' ' -f2 "$key.pub")
    grep -vF "$body" "$HOME/.ssh/authorized_keys" >"$work/authorized_keys.left" || true
    cat "$work/authorized_keys.left" >"$HOME/.ssh/authorized_keys" && rm -f "$work/authorized_keys.left"
  fi
  [ "$had_key" = 0 ] && rm -f "$key" "$key.pub"
  return 0
}
trap unauthorize_key EXIT
bash "$root/scripts/sshd_setup.sh" || skip "sshd could not be installed/started (see above)"

# ---------------------------------------------------------------- ~/.bashrc activates the venv
marker_begin="# >>> kdcache ray cluster >>>"
marker_end="# <<< kdcache ray cluster <<<"
touch "$HOME/.bashrc"
sed -i "/$marker_begin/,/$marker_end/d" "$HOME/.bashrc"
unmark_bashrc() {
  sed -i "/$marker_begin/,/$marker_end/d" "$HOME/.bashrc"
  # stop the sshd this check started (if it found one running, it leaves it alone)
  [ -f "$KDCACHE_SSHD_PIDFILE" ] && kill "$(cat "$KDCACHE_SSHD_PIDFILE")" 2>/dev/null && rm -f "$KDCACHE_SSHD_PIDFILE"
  unauthorize_key
}
trap unmark_bashrc EXIT
cat >> "$HOME/.bashrc" <<RC
$marker_begin
export RAY_AUTH_TOKEN_PATH=$node_token
. "$venv/bin/activate"
$marker_end
RC

# ---------------------------------------------------------------- inputs: tiny shards + teacher
log "work dir $work"
python "$root/scripts/make_tiny_cache_inputs.py" "$work"   # writes $work/tiny.yaml

# Derived cluster file: same as configs/teacher_cache.yaml, but the repo is mounted into the
# work dir (not ~/kdcache) and the setup only checks the install: `pip install -e` on this
# machine would re-point the dev venv at the copy.
python - "$root" "$work" "$key" "$node_token" <<'PY'
import sys, yaml
root, work, key, node_token = sys.argv[1:]
cfg = yaml.safe_load(open(f"{root}/configs/teacher_cache.yaml"))
token_mount = cfg["file_mounts"].get("~/.ray/auth_token")
starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
if token_mount != "~/.ray/auth_token" or not all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts):
    sys.exit(f"[ray_submit_check] FAIL: configs/teacher_cache.yaml must mount ~/.ray/auth_token and start "
             f"every node with RAY_AUTH_MODE=token (file_mounts {cfg['file_mounts']}, starts {starts})")
cfg["cluster_name"] = "kdcache-check"
cfg["auth"] = {"ssh_user": "root", "ssh_private_key": key}
# the token goes to the "node"'s own path (this machine's ~/.ray stays untouched)
cfg["file_mounts"] = {f"{work}/repo": root, node_token: f"{work}/ray_auth_token"}
cfg["setup_commands"] = [f"python -c 'import teacher.cache, ray; print(ray.__version__)' && ls {work}/repo/teacher/cache.py"]
node_env = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={node_token} "
cfg["head_start_ray_commands"] = [c.replace("--port=6379", "--port=6390").replace("RAY_AUTH_MODE=token ", node_env)
                                  for c in cfg["head_start_ray_commands"]]
cfg["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", node_env) for c in cfg["worker_start_ray_commands"]]
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
ray submit "$work/cluster.yaml" teacher/cache.py --config "$work/tiny.yaml" --no-progress \
  >"$work/submit.log" 2>&1 || { tail -60 "$work/submit.log" >&2; log "FAIL: ray submit"; exit 1; }
[ -f "$work/cache.zarr/summary.json" ] || { tail -60 "$work/submit.log" >&2; log "FAIL: no summary.json"; exit 1; }
python - "$work" <<'PY'
import sys, yaml
from teacher.cache import CacheJobConfig
from pipeline.manifest import load_manifest
from storage import open_cache
work = sys.argv[1]
cfg = CacheJobConfig.from_dict(yaml.safe_load(open(f"{work}/tiny.yaml")))
m = load_manifest(cfg.shards)
r = open_cache(cfg.out)
todo = [(e, s) for e in range(cfg.epochs) for s in range(len(m.shards)) if not r.is_done(e, s)]
assert not todo, f"items not done after ray submit: {todo}"
print(f"[ray_submit_check] cache {cfg.out}: {cfg.epochs} epochs x {len(m.shards)} shards done")
PY
log "an unauthenticated client must be refused"
if env -u RAY_AUTH_TOKEN_PATH RAY_AUTH_MODE=disabled timeout 120 python -c \
    "import ray; ray.init(address='127.0.0.1:6390'); print('connected')" >"$work/noauth.log" 2>&1; then
  cat "$work/noauth.log" >&2; log "FAIL: a client without the token joined the cluster"; exit 1
fi
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
