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
#            Where the CUDA objects need compiling, nvcc runs in the background while the
#            interpreter tier runs (it does not need grove_kernels._C); the extension is then
#            installed and the other tiers run. Each tier's wall time is printed as it ends and
#            again in a summary line.
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
  build_overlap=1
fi
_test_t0=$SECONDS
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
set +e
# Two pytest workers where there are two cores (a worker's start costs ~10 s of imports; more
# workers than cores only contend). worksteal: a worker that runs out of tests takes pending
# ones from the other, so no long test leaves a tail; loadgroup where files share a long module
# fixture (the xdist groups of tests/conftest.py and bench/conftest.py: it then runs on one
# worker only).
cores=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))" 2>/dev/null)
workers=()
grouped=()
if [ "${cores:-1}" -ge 2 ] && "$PY" -c "import xdist" 2>/dev/null; then
  workers=(-n 2 --dist worksteal)
  grouped=(-n 2 --dist loadgroup)
fi
times=("setup $((SECONDS - _test_t0)) s")
# tier NAME CMD...: run CMD, print and record its wall time; its status is returned.
tier() {
  local name=$1 t0=$SECONDS rc=0
  shift
  "$@" || rc=$?
  echo "[test] $name: $((SECONDS - t0)) s wall (exit $rc)"
  times+=("$name $((SECONDS - t0)) s")
  return "$rc"
}
if [ "$quick" = 1 ]; then
  tier unit "$PY" -m pytest -q -ra -m unit "${workers[@]}" tests "$@"
  exit $?
fi
rc=0
tier interpreter "$PY" -m pytest -q -ra -m interpreter "${workers[@]}" tests "$@" || rc=1
if [ -n "${cuda_build_pid:-}" ]; then
  tier "cuda build (rest of nvcc, install)" finish_cuda_build || rc=1
fi
tier "unit+toolchain+e2e+gpu" "$PY" -m pytest -q -ra -m "unit or toolchain or e2e or gpu" \
  "${grouped[@]}" tests "$@" || rc=1
tier "bench+scripts" "$PY" -m pytest -q -ra "${grouped[@]}" bench scripts --benchmark-disable \
  || rc=1
summary=$(printf '%s; ' "${times[@]}")
echo "[test] wall time: ${summary}total $((SECONDS - _test_t0)) s"
exit $rc
