#!/usr/bin/env bash
# The tests, by tier (docs/design.md §5). Usage: bash scripts/test.sh [--quick] [pytest args]
#   --quick  the unit tier only (torch backend, plan, routing, errors, API): no CUDA build, no
#            reinstall when nothing changed
#   default  (CI) every tier that can run here: unit, toolchain (nvcc, SASS, Triton codegen,
#            torch.compile, the wheel; the CUDA extension is built wherever nvcc and the CUTLASS
#            headers are, GPU or not), e2e (the reference model, expert parallel),
#            interpreter (Triton kernels; under its interpreter without a GPU), gpu (skipped
#            without CUDA); then the tests of the bench and of these scripts, which live beside
#            them. Installs the optional integrations' test dependencies (transformers 5).
quick=0
if [ "${1:-}" = --quick ]; then
  quick=1
  shift
fi
if [ "$quick" = 1 ]; then
  cuda_ext=keep
else
  cuda_ext=auto
  test_extras=1
fi
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
set +e
# Two pytest workers where there are two cores (a worker's start costs ~10 s of imports; more
# workers than cores only contend).
cores=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))" 2>/dev/null)
workers=()
if [ "${cores:-1}" -ge 2 ] && "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 2); fi
if [ "$quick" = 1 ]; then
  "$PY" -m pytest -q -ra -m unit "${workers[@]}" tests "$@"
  exit $?
fi
rc=0
"$PY" -m pytest -q -ra -m "unit or toolchain or e2e or gpu" "${workers[@]}" tests "$@" || rc=1
"$PY" -m pytest -q -ra -m interpreter "${workers[@]}" tests "$@" || rc=1
"$PY" -m pytest -q -ra bench scripts --benchmark-disable || rc=1
exit $rc
