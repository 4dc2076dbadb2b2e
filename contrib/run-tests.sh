#!/usr/bin/env bash
# The whole test suite from a clean clone: system packages, a fresh venv, pytest, then the
# kernel-guest tier.  README's test command and .ci/run both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# The whole run's budget (CI allows 90 min): the kernel tier cuts its phases to what is left of
# it and says so, instead of running past it (normally the run needs about 30 min).
budget=${LU2K_RUN_BUDGET:-5100}
export LU2K_KT_DEADLINE=${LU2K_KT_DEADLINE:-$(( $(date +%s) + budget ))}

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

kernel_tier=0
if [ -x contrib/kernel-tests/run ] && [ $# -eq 0 ]; then
  kernel_tier=1
  # The kernel tier's set-up (guest kernel, virtme-ng, the LNet build; all cached) runs beside
  # the host tests at the lowest CPU priority: it only takes the CPU they leave idle.
  mkdir -p build/kernel-tests
  nice -n 19 timeout --kill-after=60 "$budget" contrib/kernel-tests/run prepare >build/kernel-tests/prepare.log 2>&1 &
  prepare=$!
fi

status=0
# Tests spread over the cores (at most 4 workers); the emulated-link tests run one at a time
# on one of them (tests/conftest.py).  A hung test is ended by tests/conftest.py's hang guard;
# the limit here (normally 10-15 min are needed) bounds everything else, so that the kernel tier
# still runs and the log says what happened.  Just before the limit every test process still
# running is sent SIGUSR1, which writes its stacks into its file in $hang_dir; the end of this
# run reports those files (tests/hangs.py) together with the host tests' failures.
host_limit=${LU2K_HOST_TESTS_LIMIT:-2700}
hang_dir=$PWD/build/test-hangs
rm -rf "$hang_dir" && mkdir -p "$hang_dir"
export LU2K_TEST_HANG_DIR=$hang_dir
(
  sleep "$host_limit"
  for running in "$hang_dir"/*.txt; do
    pid=${running##*-}  # the files are named <worker>-<pid>.txt
    [ -e "$running" ] && kill -USR1 "${pid%.txt}" 2>/dev/null || true
  done
) >/dev/null 2>&1 &
limit_watch=$!
timeout --kill-after=60 "$((host_limit + 10))" \
  "$venv/bin/python" -m pytest -p no:cacheprovider -q -n auto --maxprocesses 4 --dist loadgroup "$@" \
  2>&1 | tee build/host-tests.log || status=$?
# The watcher first (so that it sends nothing once the tests are done), then its sleep.
watch_sleep=$(pgrep -P "$limit_watch" sleep || true)
kill "$limit_watch" 2>/dev/null || true
[ -n "$watch_sleep" ] && kill "$watch_sleep" 2>/dev/null || true
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
  echo "run-tests: the host tests ran past ${host_limit} s and were stopped" >&2
fi
if [ "$kernel_tier" = 1 ]; then
  # A failed set-up is not fatal here: the tier tries again and reports what failed.
  wait "$prepare" || true
  cat build/kernel-tests/prepare.log
  LU2K_VENV="$PWD/$venv" contrib/kernel-tests/run || status=$?
fi
# Repeated at the end, where a log read from its tail shows it.
echo "run-tests: host tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed)' build/host-tests.log | tail -1 || echo 'no summary (stopped)')"
grep -E '^(FAILED|ERROR) |crashed while running' build/host-tests.log | head -40 || true
"$venv/bin/python" tests/hangs.py "$hang_dir"
echo "run-tests: exit status $status"
exit $status
