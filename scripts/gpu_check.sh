#!/usr/bin/env bash
# One GPU session's measurements in one go (a GPU machine has no network: nothing is
# installed here beyond the package itself). Usage: bash scripts/gpu_check.sh OUT_DIR
#   1. the GPU tests (every backend against the float64 reference, graph capture, no syncs)
#   2. the Triton tile tuner at grove-33b shapes      -> OUT_DIR/configs.json
#   3. the benchmark protocol of DESIGN §6             -> OUT_DIR/<device>_<date>.{json,png}
# Copy OUT_DIR/configs.json to grove_kernels/triton/ and the results to bench/results/.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -15
"$PY" -m grove_kernels.triton.tune --out "$out/configs.json" > "$out/tune.log" 2>&1
tail -3 "$out/tune.log"
cp "$out/configs.json" grove_kernels/triton/configs.json 2>/dev/null  # the bench uses them
"$PY" -m bench --pass both --routing uniform,coactive,skewed --results-dir "$out" 2>&1 \
  | tee "$out/bench.log" | tail -60
