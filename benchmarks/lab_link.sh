#!/usr/bin/env bash
# One link benchmark: lu2k (backend $BACKEND) over an emulated GEO hop with 1 % loss each way,
# next to kernel TCP CUBIC and BBR on the same emulated link in the same run.
# Needs root.  Override anything: BACKEND=quic ./lab_link.sh --profile leo --loss 2%
set -euo pipefail
exec "${PYTHON:-python3}" -m lu2k.cli.main bench link --backend "${BACKEND:-tcp}" --profile geo --loss 1% \
  --duration "${DURATION:-20}" --warmup "${WARMUP:-10}" --plot "${PLOT:-link-timeseries.png}" "$@"
