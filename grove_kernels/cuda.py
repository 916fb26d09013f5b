"""The `cuda` backend: the CUTLASS/CUDA kernels of csrc/, built as grove_kernels._C.

The extension exists only where setup.py found a CUDA toolkit and a CUDA torch; until its
kernels are registered (issue 4) this backend reports itself unavailable, so `auto` never
picks it.
"""
import torch

try:
    from . import _C  # noqa: F401
except ImportError:
    _C = None

runs_on_cpu = False


def is_available():
    return _C is not None and hasattr(torch.ops, "grove_cuda") and torch.cuda.is_available()
