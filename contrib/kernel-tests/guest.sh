#!/bin/bash
# Runs *inside* the QEMU guest booted by contrib/kernel-tests/run (as root, host root
# shared read-only over 9p).  Loads the kernel modules the guest tests need, then runs all
# guest tests (but the LNet bed's test_lnet_*.py, which run on the host) in one pytest
# invocation and leaves pytest.log, junit.xml and status in OUT
# (the --rwdir), which is how results get back to the host.
#
# usage: guest.sh OUT PYTHON REPO [EXTRA_PYTEST_ARGS]

# QEMU's console is fd 1; keep stderr on it too so nothing is lost.
exec 2>&1
OUT=$1
PY=$2
REPO=$3
EXTRA=${4:-}

echo "[guest] kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2/1024 " MiB"}' /proc/meminfo)"
for mod in rds_tcp sch_netem rdma_rxe veth tcp_bbr; do
    if modprobe "$mod"; then echo "[guest] modprobe $mod: ok"; else echo "[guest] modprobe $mod: FAILED"; fi
done
ip link set lo up
# Soft-RoCE on the loopback device: the o2ib (verbs) tests run both ends on it.
if rdma link add lu2k_rxe type rxe netdev lo; then
    echo "[guest] soft-RoCE: $(rdma link show lu2k_rxe/1)"
else
    echo "[guest] rdma link add lu2k_rxe (rxe on lo): FAILED"
fi

# The root is read-only: everything pytest writes goes to a tmpfs of our own.
SCRATCH=/run/lu2k-kt
mkdir -p "$SCRATCH"
export TMPDIR=$SCRATCH
export PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export LU2K_KERNEL_GUEST=1  # tests/guest/conftest.py: guest tests run only when this is set
export LU2K_KT_OUT=$OUT

cd "$REPO" || { echo 2 > "$OUT/status"; exit 0; }
# EXTRA is one string of pytest arguments, shell-quoted (e.g. -k "rds and not engine").
eval "EXTRA_ARGS=($EXTRA)"
"$PY" -m pytest -p no:cacheprovider --basetemp="$SCRATCH/pytest" -rfEs --tb=native --timeout=300 --durations=12 \
    --junitxml="$OUT/junit.xml" --ignore-glob='*/test_lnet_*.py' tests/guest "${EXTRA_ARGS[@]}" 2>&1 | tee "$OUT/pytest.log"
echo "${PIPESTATUS[0]}" > "$OUT/status"
sync
