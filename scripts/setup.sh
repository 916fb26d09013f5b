# Sourced by scripts/demo.sh and scripts/test.sh: install what a fresh machine lacks, then the
# package itself (editable, against the torch already present; never a CUDA torch download).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  # The CPU wheel of this exact version is what CPU machines here carry locally.
  pip_install torch==2.13.0
fi
missing=()
"$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" \
  2>/dev/null || missing+=("setuptools>=64")
for mod_pkg in wheel:wheel numpy:numpy safetensors:safetensors pytest:pytest \
               pytest_benchmark:pytest-benchmark; do
  "$PY" -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg#*:}")
done
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  # No GPU: the Triton backend runs (and is tested) under Triton's interpreter, pinned to the
  # GPU machines' Triton. Its interpreter calls int() on 1-element arrays, which numpy 2.4
  # rejects, so numpy stays below 2.4 here.
  "$PY" -c "import triton" 2>/dev/null || missing+=("triton==3.6.0")
  "$PY" -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" \
    2>/dev/null || missing+=("numpy<2.4")
fi
if [ ${#missing[@]} -gt 0 ]; then pip_install "${missing[@]}"; fi
# CUTLASS 4.2 C++ headers for the CUDA extension (csrc/; 6 MB, headers only, so --no-deps).
# Not fatal: without them (e.g. no network) setup.py just skips grove_kernels._C.
if ! "$PY" -c "import cutlass_library" 2>/dev/null; then
  pip_install --no-deps nvidia-cutlass==4.2.0.0 \
    || echo "setup.sh: could not install nvidia-cutlass; the CUDA extension will not be built" >&2
fi
pip_install --no-build-isolation -e .
