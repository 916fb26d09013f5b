# Sourced by scripts/demo.sh and scripts/test.sh: install what a fresh machine lacks, then the
# package itself (editable, against the torch already present; never a CUDA torch download).
#
# The CUDA extension grove_kernels._C (csrc/, minutes of nvcc on a fresh machine) is built
# according to the caller's `cuda_ext` (a shell variable, set before sourcing):
#   auto  wherever nvcc and the CUTLASS headers are (test.sh, CI: the build and its SASS are
#         tested even without a GPU)
#   gpu   only where a CUDA GPU is present (demo.sh: on a CPU machine its kernels cannot run)
#   keep  whatever this checkout was last installed with; without the extension on a first
#         install (test.sh --quick)
# GROVE_BUILD_CUDA=0|1|auto in the environment overrides them. build_overlap=1 (test.sh) with
# auto: the objects compile in the background (log: build/cuda_build.log) while the package is
# installed without the extension for the tests that do not need it; the caller then runs
# finish_cuda_build, which waits for nvcc and reinstalls with the extension (on two cores the
# CPU work is the same either way: the overlap fills the time tests or nvcc leave a core idle).
# test_extras=1 (test.sh) also
# installs what the optional integrations' tests need (transformers 5, accelerate). The install
# is skipped when the package imported is this checkout's and build/install.stamp records the
# same setup.py, pyproject.toml, csrc/ sources and build choice; otherwise it reinstalls with
# the caller's choice, so an install without the extension (a demo) never stops a later
# test.sh from building it. Compiled objects are cached in build/grove_cuda/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
_setup_t0=$SECONDS

step() { echo "[setup +$((SECONDS - _setup_t0))s] $*"; }
finish_cuda_build() { :; }  # redefined below when nvcc runs in the background
# pip without -q: its download lines and progress bars are the progress shown.
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }
# with_heartbeat LABEL CMD...: run CMD, printing a line every 30 s while it works silently.
with_heartbeat() {
  local label=$1 beat rc=0
  shift
  (
    s=
    trap 'kill "$s" 2>/dev/null; exit 0' TERM
    t=0
    while :; do
      sleep 30 </dev/null >/dev/null 2>&1 &
      s=$!
      wait "$s"
      t=$((t + 30))
      echo "[setup]   ... $label: still running (${t} s)"
    done
  ) &
  beat=$!
  "$@" || rc=$?
  kill "$beat" 2>/dev/null || true
  wait "$beat" 2>/dev/null || true
  return "$rc"
}

stamp_file=${GROVE_INSTALL_STAMP:-build/install.stamp}
# What an install depends on: the packaging files, the CUDA sources, the build choice, the
# interpreter. Python sources are not in it: the install is editable.
install_key() {
  { echo "$1 $("$PY" -c 'import sys; print(sys.executable)')"
    cat setup.py pyproject.toml
    if [ "$1" != 0 ]; then find csrc -type f | LC_ALL=C sort | xargs cat; fi
  } | sha256sum | cut -d' ' -f1
}
installed_here() {  # the grove_kernels that imports (from elsewhere than the cwd) is this one
  [ "$(cd / && "$PY" -c 'import os, grove_kernels; print(os.path.dirname(os.path.realpath(grove_kernels.__file__)))' 2>/dev/null)" = "$PWD/grove_kernels" ]
}

# The quick path (test.sh --quick: keep the last install): nothing to probe or install when
# this checkout is installed, unchanged, with the build choice its stamp records.
if [ "${cuda_ext:-}" = keep ] && [ -z "${GROVE_BUILD_CUDA:-}" ] && [ -f "$stamp_file" ]; then
  kept=$(cut -d' ' -f1 "$stamp_file")
  if [ "$(cat "$stamp_file")" = "$kept $(install_key "$kept")" ] && installed_here; then
    step "grove-kernels already installed from this checkout (GROVE_BUILD_CUDA=$kept, unchanged)"
    step "ready"
    return 0 2>/dev/null || exit 0
  fi
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  # The CPU wheel of this exact version is what CPU machines here carry locally.
  step "installing torch 2.13.0 (CPU wheel)"
  pip_install torch==2.13.0
fi
has_gpu=0
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  has_gpu=1
fi
missing=()
"$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" \
  2>/dev/null || missing+=("setuptools>=64")
for mod_pkg in wheel:wheel numpy:numpy safetensors:safetensors pytest:pytest \
               pytest_benchmark:pytest-benchmark xdist:pytest-xdist hypothesis:hypothesis; do
  "$PY" -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg#*:}")
done
if [ "$has_gpu" = 0 ]; then
  # No GPU: the Triton backend runs (and is tested) under Triton's interpreter, pinned to the
  # GPU machines' Triton. Its interpreter calls int() on 1-element arrays, which numpy 2.4
  # rejects, so numpy stays below 2.4 here.
  "$PY" -c "import triton" 2>/dev/null || missing+=("triton==3.6.0")
  "$PY" -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" \
    2>/dev/null || missing+=("numpy<2.4")
fi
if [ "${test_extras:-0}" = 1 ]; then
  # The optional transformers integration's tests (accelerate: the transformers Trainer's).
  "$PY" -c "import transformers, accelerate, sys; \
            sys.exit(int(transformers.__version__.split('.')[0]) != 5)" 2>/dev/null \
    || missing+=("transformers>=5,<6" "accelerate")
fi
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  pip_install "${missing[@]}"
fi

build=${GROVE_BUILD_CUDA:-}
if [ -z "$build" ]; then
  case ${cuda_ext:-auto} in
    gpu) if [ "$has_gpu" = 0 ]; then build=0; else build=auto; fi ;;
    keep) if [ -f "$stamp_file" ]; then build=$(cut -d' ' -f1 "$stamp_file"); else build=0; fi ;;
    *) build=auto ;;
  esac
fi
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$build $(install_key "$build")" ] \
    && installed_here; then
  step "grove-kernels already installed from this checkout (GROVE_BUILD_CUDA=$build, unchanged)"
  step "ready"
  return 0 2>/dev/null || exit 0
fi
if [ "$build" = 0 ]; then
  why=$([ "$has_gpu" = 0 ] && echo ", no GPU here" || true)
  step "no CUDA extension for this run (GROVE_BUILD_CUDA=0$why)"
else
  # CUTLASS 4.2 C++ headers for the CUDA extension (6 MB, headers only, so --no-deps). Not
  # fatal: without them (e.g. no network) setup.py just skips grove_kernels._C.
  if ! "$PY" -c "import cutlass_library" 2>/dev/null; then
    step "installing the CUTLASS 4.2 headers (nvidia-cutlass)"
    pip_install --no-deps nvidia-cutlass==4.2.0.0 \
      || echo "setup.sh: could not install nvidia-cutlass; the CUDA extension will not be built" >&2
  fi
  # The objects are compiled here, where their progress shows (one line per .cu), rather
  # than inside pip, which hides a build's output; pip then finds them cached.
  if "$PY" -c "import sys; sys.path.insert(0, 'csrc'); import build_cuda; \
               sys.exit(bool(build_cuda.missing_prerequisites()))" 2>/dev/null; then
    if [ "${build_overlap:-0}" = 1 ] && [ "$build" = auto ]; then
      step "compiling the CUDA kernels in the background (csrc/ for sm_90a; log: build/cuda_build.log)"
      mkdir -p build
      "$PY" csrc/build_cuda.py > build/cuda_build.log 2>&1 &
      cuda_build_pid=$!
      build=0
    else
      step "compiling the CUDA kernels (csrc/ for sm_90a; minutes the first time, then cached)"
      if ! with_heartbeat "nvcc" "$PY" csrc/build_cuda.py; then
        if [ "$build" = 1 ]; then exit 1; fi
        # Not fatal under auto (as setup.py): tests/test_cuda_build.py reports the failure.
        echo "setup.sh: the CUDA objects failed to compile; installing without grove_kernels._C" >&2
        build=0
      fi
    fi
  fi
fi
install_editable() {
  step "installing grove-kernels (editable, GROVE_BUILD_CUDA=$1)"
  GROVE_BUILD_CUDA=$1 with_heartbeat "pip install -e ." \
    pip_install --no-build-isolation -e .
}
install_editable "$build"
if [ -n "${cuda_build_pid:-}" ]; then
  # No stamp yet: interrupted before finish_cuda_build, the next run installs again.
  step "ready without grove_kernels._C (nvcc still compiling in the background)"
  finish_cuda_build() {
    local rc=0 final=auto
    step "waiting for the background CUDA build"
    with_heartbeat "nvcc" wait "$cuda_build_pid" || rc=$?
    cuda_build_pid=
    cat build/cuda_build.log
    if [ "$rc" != 0 ]; then
      echo "setup.sh: the CUDA objects failed to compile; installing without grove_kernels._C" >&2
      final=0
    fi
    install_editable "$final" || return
    mkdir -p "$(dirname "$stamp_file")"
    echo "$final $(install_key "$final")" > "$stamp_file"
    step "ready"
  }
  return 0 2>/dev/null || exit 0
fi
mkdir -p "$(dirname "$stamp_file")"
echo "$build $(install_key "$build")" > "$stamp_file"
step "ready"
