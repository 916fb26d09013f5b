#!/usr/bin/env bash
# The test suite (GPU tests run only where CUDA is present). Usage: bash scripts/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PY" -m pytest -q -ra tests "$@"
"$PY" -m pytest -q bench --benchmark-disable
