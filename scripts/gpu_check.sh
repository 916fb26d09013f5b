#!/usr/bin/env bash
# The measurements of a GPU machine (no network assumed: nothing is installed beyond the
# package itself, run from the source tree). Usage:
#   bash scripts/gpu_check.sh OUT_DIR [all|build|tests|sanitize|tune|bench]   (default: all)
#   build  grove_kernels._C in place (nvcc + CUTLASS headers: CUTLASS_WHEEL=path/to/
#          nvidia_cutlass-4.2.0.0-py3-none-any.whl installs them offline; objects already in
#          build/grove_cuda with the same nvcc are reused, e.g. built elsewhere by
#          `python csrc/build_cuda.py`).
#   tests  python -m grove_kernels.selfcheck (every backend against float64 at grove-33b) and
#          the GPU tests (every backend against the float64 reference, graph capture, no syncs;
#          the Grove API tests on both adjugate layouts, GROVE_ADJUGATE_LAYOUT=sections|folded)
#   sanitize  compute-sanitizer memcheck over the cuda backend's op tests (folded row kernels
#          and two-section GEMMs included) and a mid-size layer's gradients on both layouts
#   tune   the Triton tile tuner at grove-33b shapes (TUNE_BUDGET_S, default 240 s)
#          -> OUT_DIR/configs.json, also copied to grove_kernels/triton/ for the bench
#   bench  the benchmark protocol of docs/design.md §6 -> OUT_DIR/<device>_<date>.{json,png};
#          with vLLM's kernel beside ours when a vLLM shim is in .anchors/vllm/shim
#          (git-ignored)
# Afterwards copy OUT_DIR/configs.json to grove_kernels/triton/ and the results to
# bench/results/.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [all|build|tests|sanitize|tune|bench]}
stage=${2:-all}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
variants=grove,plain,grove-2call,grouped_mm,grouped_mm-plain
if [[ -d .anchors/vllm/shim ]]; then
  export PYTHONPATH="$PWD/.anchors/vllm/shim:$PYTHONPATH"
  variants+=,vllm
fi
case $stage in all|build|tests|sanitize|tune|bench) ;; *) echo "unknown stage: $stage" >&2; exit 2 ;; esac
if [[ $stage == all || $stage == build ]]; then
  if [[ -n ${CUTLASS_WHEEL:-} ]] && ! "$PY" -c "import cutlass_library" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index "$CUTLASS_WHEEL"
  fi
  GROVE_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace 2>&1 | tail -5
  "$PY" -c "import grove_kernels.cuda as c; print(c.build_info())"
fi
if [[ $stage == all || $stage == tests ]]; then
  "$PY" -m grove_kernels.selfcheck 2>&1 | tee "$out/selfcheck.log" | tail -8
  # The cuda backend's tests get their own processes, so a CUDA error there (which poisons
  # the context) cannot fail the torch/triton tests.
  GROVE_TEST_BACKENDS=torch,triton "$PY" -m pytest -q -m gpu tests \
    --ignore=tests/test_cuda_ops_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -15
  "$PY" -m pytest -q -m gpu tests/test_cuda_ops_gpu.py 2>&1 | tee "$out/gpu_cuda_ops.log" | tail -15
  GROVE_TEST_BACKENDS=cuda "$PY" -m pytest -q -m gpu tests/test_api_gpu.py 2>&1 \
    | tee "$out/gpu_cuda_api.log" | tail -15
fi
if [[ $stage == all || $stage == sanitize ]]; then
  GROVE_TEST_BACKENDS=cuda compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest -q -x tests/test_cuda_ops_gpu.py \
    "tests/test_api_gpu.py::test_fused_grove_experts_grad_gpu" 2>&1 \
    | tee "$out/sanitize.log" | tail -15
fi
if [[ $stage == all || $stage == tune ]]; then
  "$PY" -m grove_kernels.triton.tune --budget-s "${TUNE_BUDGET_S:-240}" \
    --out "$out/configs.json" > "$out/tune.log" 2>&1
  tail -3 "$out/tune.log"
  cp "$out/configs.json" grove_kernels/triton/configs.json 2>/dev/null
fi
if [[ $stage == all || $stage == bench ]]; then
  "$PY" -m bench --pass both --routing uniform,coactive,skewed --results-dir "$out" \
    --variants "$variants" --backends "${BENCH_BACKENDS:-triton,cuda}" 2>&1 \
    | tee "$out/bench.log" | tail -60
fi
