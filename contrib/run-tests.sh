#!/usr/bin/env bash
# The whole test suite from a clean clone: system packages, a fresh venv, pytest, then the
# kernel-guest tier.  README's test command and .ci/run both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

pkgs=$(grep -v '^\s*#' .ci/requirements-apt.txt 2>/dev/null | tr -s ' \n' ' ' || true)
if [ -n "${pkgs// /}" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  else
    echo "run-tests: not root; assuming these Debian packages are installed: $pkgs" >&2
  fi
fi

venv=.venv-test
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q '.[test]'

# Lint and types first (configured in pyproject.toml); an error fails the run.
"$venv/bin/ruff" check .
"$venv/bin/mypy"

status=0
"$venv/bin/python" -m pytest -p no:cacheprovider -q "$@" || status=$?
if [ -x contrib/kernel-tests/run ] && [ $# -eq 0 ]; then
  LU2K_VENV="$PWD/$venv" contrib/kernel-tests/run || status=$?
fi
exit $status
