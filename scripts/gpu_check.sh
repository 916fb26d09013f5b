#!/usr/bin/env bash
# One GPU session's measurements (a GPU machine has no network: nothing is installed here
# beyond the package itself, run from the source tree). Usage:
#   bash scripts/gpu_check.sh OUT_DIR [all|tests|tune|bench]      (default: all)
#   tests  the GPU tests (every backend against the float64 reference, graph capture, no syncs)
#   tune   the Triton tile tuner at grove-33b shapes (TUNE_BUDGET_S, default 240 s)
#          -> OUT_DIR/configs.json, also copied to grove_kernels/triton/ for the bench
#   bench  the benchmark protocol of DESIGN §6 -> OUT_DIR/<device>_<date>.{json,png}
# Each stage fits one 10-minute device command. Afterwards copy OUT_DIR/configs.json to
# grove_kernels/triton/ and the results to bench/results/.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [all|tests|tune|bench]}
stage=${2:-all}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
case $stage in all|tests|tune|bench) ;; *) echo "unknown stage: $stage" >&2; exit 2 ;; esac
if [[ $stage == all || $stage == tests ]]; then
  "$PY" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi
if [[ $stage == all || $stage == tune ]]; then
  "$PY" -m grove_kernels.triton.tune --budget-s "${TUNE_BUDGET_S:-240}" \
    --out "$out/configs.json" > "$out/tune.log" 2>&1
  tail -3 "$out/tune.log"
  cp "$out/configs.json" grove_kernels/triton/configs.json 2>/dev/null
fi
if [[ $stage == all || $stage == bench ]]; then
  "$PY" -m bench --pass both --routing uniform,coactive,skewed --results-dir "$out" 2>&1 \
    | tee "$out/bench.log" | tail -60
fi
