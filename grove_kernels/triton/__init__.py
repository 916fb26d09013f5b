"""The `triton` backend: routing, plan and grouped-GEMM kernels in Triton, for any GPU Triton
supports and, with TRITON_INTERPRET=1 set before this package is imported, for the CPU through
Triton's interpreter (how CI tests it). This module only describes the backend (backends.py);
the kernels are imported when a call first runs.

    routing.py       logits -> (weights, ids)                     one launch
    plan.py          (ids, weights) -> Plan                       four launches
    plan_folded.py   (ids, weights) -> FoldedPlan                 four launches
    backend.py       the experts stage: forward and backward over the kernels below
    gemm1_swiglu.py  GEMM-1 with SwiGLU in its epilogue           m-grouped, rows gathered from x
    gemm_m_grouped.py  GEMM-2 and the data gradients (dGEMM-2 + SwiGLU', dGEMM-1), m-grouped
    gemm_k_grouped.py  weight gradients (K = rows of a problem), k-grouped
    gemm_common.py   the row-block schedule and numerics every grouped GEMM shares
    combine.py       per-token sum of rows (y, and dx in the backward)
    backend_folded.py, gemm_folded.py, wgrad_folded.py   the folded adjugate layout
    config.py, tune.py, codegen_check.py   tile configurations, their tuner, an sm_90 AOT check
"""
import os

import torch

from ..experts import unsupported

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the interpreter the kernels run on CPU tensors; compiled, they need a GPU.
runs_on_cpu = INTERPRET
IMPLEMENTATION = "grove_kernels.triton.backend"
LAYOUTS = ("sections", "folded")  # adjugate layouts (folded: backend_folded.py)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return INTERPRET or torch.cuda.is_available()


def supports(x, weights):
    if x.device.type != "cuda" and not runs_on_cpu:
        return f"hidden_states: the triton backend runs on CUDA devices, got {x.device}"
    reason = unsupported("triton", x, weights, DTYPES)
    if reason is not None and x.dtype == torch.float64:
        reason += "; use the torch backend for float64"
    return reason
