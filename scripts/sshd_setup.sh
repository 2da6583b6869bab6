#!/usr/bin/env bash
# Make `ssh -i ~/.ssh/kdcache_ray root@127.0.0.1` work (for the Ray cluster launcher's local
# provider): install openssh-server + rsync if missing, generate the key, authorize it, start sshd.
# Idempotent; needs root (or passwordless sudo). Exit 1 if sshd cannot be made to work.
# When it has to start sshd and KDCACHE_SSHD_PIDFILE is set, the daemon's pid goes there (so the
# caller can stop it again).
set -euo pipefail
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
key=$HOME/.ssh/kdcache_ray
if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
  ($SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q openssh-server openssh-client rsync) >/dev/null \
    || { echo "sshd_setup: apt-get install openssh-server rsync failed" >&2; exit 1; }
fi
mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
[ -f "$key" ] || ssh-keygen -q -t ed25519 -N "" -C kdcache-ray -f "$key"
touch "$HOME/.ssh/authorized_keys" && chmod 600 "$HOME/.ssh/authorized_keys"
grep -qF "$(cut -d' ' -f2 "$key.pub")" "$HOME/.ssh/authorized_keys" || cat "$key.pub" >> "$HOME/.ssh/authorized_keys"
try() { ssh -i "$key" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
          -o ConnectTimeout=5 -o LogLevel=ERROR root@127.0.0.1 true 2>/dev/null; }
if ! try; then
  $SUDO mkdir -p /run/sshd
  [ -f /etc/ssh/ssh_host_ed25519_key ] || $SUDO ssh-keygen -A
  pidfile=${KDCACHE_SSHD_PIDFILE:-/run/sshd.pid}
  $SUDO /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password -o PubkeyAuthentication=yes \
    -o PidFile="$pidfile" \
    || { echo "sshd_setup: could not start sshd" >&2; exit 1; }
  for _ in 1 2 3 4 5; do try && break; sleep 1; done
fi
try || { echo "sshd_setup: ssh root@127.0.0.1 with $key does not work" >&2; exit 1; }
echo "sshd_setup: ssh root@127.0.0.1 works" >&2
