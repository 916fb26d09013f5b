#!/usr/bin/env bash
# The main job: the Grove layer on the best device present, checked against the float64
# reference, then a small timing table. Usage: bash scripts/demo.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PY" -m grove_kernels.selfcheck
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  "$PY" -m bench --tokens 1,64,1024,4096 --pass fwd
else
  "$PY" -m bench --preset small --tokens 1,16,64 --pass both
fi
