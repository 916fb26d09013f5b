#!/usr/bin/env bash
# The test suite (GPU tests run only where CUDA is present). Usage: bash scripts/test.sh [pytest args]
# Builds the CUDA extension wherever nvcc and the CUTLASS headers are, GPU or not: its build and
# SASS (HGMMA) checks run on the CPU.
cuda_ext=auto
test_extras=1
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PY" -m pytest -q -ra tests "$@"
"$PY" -m pytest -q bench --benchmark-disable
