"""The `triton` backend: routing, plan and grouped-GEMM kernels in Triton (issue 3).

Runs on any CUDA GPU that Triton supports and, with TRITON_INTERPRET=1 set before this
package is imported, on the CPU through Triton's interpreter (how CI tests it).
"""
import os

try:
    import triton  # noqa: F401
    _HAVE_TRITON = True
except ImportError:
    _HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the interpreter the kernels run on CPU tensors; compiled, they need a GPU.
runs_on_cpu = INTERPRET


def is_available():
    if not _HAVE_TRITON:
        return False
    import torch

    return INTERPRET or torch.cuda.is_available()
