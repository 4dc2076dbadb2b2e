#!/usr/bin/env bash
# Install lu2k with every backend into a venv (system packages via apt-get when root).
# Quiet on success: one line saying what was installed.  --help for the options.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash contrib/install.sh [--venv DIR] [--etc DIR] [--service] [--no-apt] [--lock-timeout S] [--wait-for-lock] [--help]

Installs lu2k with every backend into a Python venv (default ./venv). As root it first
installs the Debian packages the backends need (g++, libudt-dev), waiting for another
package manager to release the dpkg lock, and writes /etc/lu2k/lu2kd.yaml (from
contrib/lu2kd.yaml) and /etc/lu2k/net.key (a new network key) unless they exist.

  --venv DIR          where to create the venv (default: ./venv)
  --etc DIR           where the configuration goes when root (default: /etc/lu2k)
  --service           also install lu2kd as a systemd service: user and group 'lu2k',
                      lu2k in /opt/lu2k/venv, the unit /etc/systemd/system/lu2kd.service
                      (enable it with: systemctl enable --now lu2kd), the commands in
                      /usr/local/bin, their man pages and bash completion
  --no-apt            do not run apt-get (the udt backend then needs g++ and libudt-dev installed)
  --lock-timeout S    seconds to wait for the dpkg lock (default 300)
  --wait-for-lock     only wait for the dpkg lock, then exit (0 when free)
  --help              this text

Environment: LU2K_DPKG_LOCKS overrides the lock files checked (space separated).
EOF
}

cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
venv=venv etc=/etc/lu2k service=0 apt=1 lock_timeout=300 wait_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=${2:?--venv needs a directory}; shift ;;
    --etc) etc=${2:?--etc needs a directory}; shift ;;
    --service) service=1; venv=/opt/lu2k/venv ;;
    --no-apt) apt=0 ;;
    --lock-timeout) lock_timeout=${2:?--lock-timeout needs seconds}; shift ;;
    --wait-for-lock) wait_only=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$lock_timeout" in ''|*[!0-9]*) echo "install: --lock-timeout needs whole seconds, got '$lock_timeout'" >&2; exit 2 ;; esac

# dpkg and apt take fcntl locks on these files; probe them the same way (and let go at once).
locks=${LU2K_DPKG_LOCKS:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock}
dpkg_locked() {
  python3 - $locks <<'PY'
import fcntl, sys
for path in sys.argv[1:]:
    try:
        f = open(path, "a")
    except OSError:
        continue
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(0)
sys.exit(1)
PY
}
wait_for_dpkg_lock() {
  local waited=0
  while dpkg_locked; do
    if [ "$waited" -eq 0 ]; then
      echo "install: another package manager holds the dpkg lock; waiting up to ${lock_timeout}s for it" >&2
    fi
    if [ "$waited" -ge "$lock_timeout" ]; then
      echo "install: the dpkg lock is still held after ${lock_timeout}s; let the other apt/dpkg finish (or raise --lock-timeout) and run this again" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

if [ "$wait_only" = 1 ]; then
  wait_for_dpkg_lock
  exit 0
fi

root=0
[ "$(id -u)" = 0 ] && root=1
if [ "$service" = 1 ] && [ "$root" = 0 ]; then
  echo "install: --service needs root" >&2
  exit 1
fi
if [ "$service" = 1 ] && [ "$etc" != /etc/lu2k ]; then
  echo "install: --service installs a unit that reads /etc/lu2k; leave out --etc" >&2
  exit 2
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() {  # quiet unless it fails; then its output and what failed
  if ! "$@" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "install: failed: $*" >&2
    exit 1
  fi
}

if [ "$apt" = 1 ] && [ "$root" = 1 ]; then
  # Only what building the backends needs (libudt for the UDT binding); the test-only packages
  # (QEMU, ffmpeg, rdma-core ...) are contrib/run-tests.sh's business.
  wait_for_dpkg_lock
  run apt-get -o DPkg::Lock::Timeout="$lock_timeout" update -qq
  run apt-get -o DPkg::Lock::Timeout="$lock_timeout" install -y -qq --no-install-recommends g++ libudt-dev python3-venv
elif [ "$apt" = 1 ]; then
  echo "install: not root; the udt backend needs g++ and libudt-dev installed" >&2
fi

run python3 -m venv "$venv"
run "$venv/bin/pip" install -q --upgrade pip
run "$venv/bin/pip" install -q '.[all]'

if [ "$root" = 1 ]; then
  install -d -m 0755 "$etc"
  [ -e "$etc/lu2kd.yaml" ] || install -m 0644 contrib/lu2kd.yaml "$etc/lu2kd.yaml"
  if [ ! -e "$etc/net.key" ]; then
    (umask 077 && "$venv/bin/lu2k" keygen psk > "$etc/net.key")
  fi
fi
if [ "$service" = 1 ]; then
  getent group lu2k >/dev/null || run groupadd --system lu2k
  getent passwd lu2k >/dev/null || run useradd --system --gid lu2k --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin lu2k
  chgrp lu2k "$etc/net.key" && chmod 0640 "$etc/net.key"
  install -m 0644 contrib/systemd/lu2kd.service /etc/systemd/system/lu2kd.service
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
  fi
  for tool in lu2k lu2kd lu2kctl; do ln -sf "$venv/bin/$tool" "/usr/local/bin/$tool"; done
  # man pages (the unit's Documentation=) and bash completion for the three commands
  man=$(mktemp -d)
  run "$venv/bin/python" contrib/gen-manpages.py --out "$man"
  install -D -m 0644 "$man/lu2k.1" /usr/local/share/man/man1/lu2k.1
  install -D -m 0644 "$man/lu2kd.8" /usr/local/share/man/man8/lu2kd.8
  install -D -m 0644 "$man/lu2kctl.8" /usr/local/share/man/man8/lu2kctl.8
  rm -rf "$man"
  if [ -d /etc/bash_completion.d ]; then
    "$venv/bin/register-python-argcomplete" lu2k lu2kd lu2kctl > /etc/bash_completion.d/lu2k
  fi
fi

echo "installed: $("$venv/bin/lu2k" --version) in $venv$([ "$service" = 1 ] && echo ", service lu2kd (systemctl enable --now lu2kd)")"
