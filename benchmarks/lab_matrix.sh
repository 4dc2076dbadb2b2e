#!/usr/bin/env bash
# Every available backend x loss 0 / 0.1 / 1 / 2 % on GEO and LEO, with kernel TCP CUBIC/BBR
# baselines per cell; writes results/lab/{matrix.json,matrix.png,timeseries.png}.
# Needs root; takes about (backends + 2) x 8 x (WARMUP + DURATION + ~5) seconds.
set -euo pipefail
exec "${PYTHON:-python3}" -m lu2k.cli.main bench matrix --duration "${DURATION:-15}" --warmup "${WARMUP:-10}" \
  --out "${OUT:-results/lab}" "$@"
