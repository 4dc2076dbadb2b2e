#!/usr/bin/env bash
# Install lu2k with every backend into ./venv (system packages via apt-get when root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# Only what building the backends needs (libudt for the UDT binding); the test-only packages
# (QEMU, ffmpeg, rdma-core ...) are contrib/run-tests.sh's business.
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends g++ libudt-dev >/dev/null
else
  echo "install: not root; the udt backend needs g++ and libudt-dev installed" >&2
fi
python3 -m venv venv
venv/bin/pip install -q --upgrade pip
venv/bin/pip install -q '.[all]'
echo "installed: $(venv/bin/lu2k --help | head -1)"
