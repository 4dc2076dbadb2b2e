#!/usr/bin/env bash
# Install lu2k with every backend into ./venv (system packages via apt-get when root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
pkgs=$(grep -v '^\s*#' .ci/requirements-apt.txt 2>/dev/null | tr -s ' \n' ' ' || true)
if [ -n "${pkgs// /}" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
python3 -m venv venv
venv/bin/pip install -q --upgrade pip
venv/bin/pip install -q '.[all]'
echo "installed: $(venv/bin/lu2k --help | head -1)"
