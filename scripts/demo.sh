#!/usr/bin/env bash
# The main job: the Grove layer on the best device present, checked against the float64
# reference, then a small timing table. Usage: bash scripts/demo.sh
# Without a GPU the CUDA extension is not built (its kernels could not run here): the first
# run takes the time of the installs only.
cuda_ext=gpu
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "[demo] every backend against the float64 reference"
"$PY" -m grove_kernels.selfcheck
echo "[demo] timings"
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  "$PY" -m bench --tokens 1,64,1024,4096 --pass fwd
else
  "$PY" -m bench --preset small --tokens 1,16,64 --pass both
fi
