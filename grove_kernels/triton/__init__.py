"""The `triton` backend: routing, plan and grouped-GEMM kernels in Triton, for any GPU Triton
supports and, with TRITON_INTERPRET=1 set before this package is imported, for the CPU through
Triton's interpreter (how CI tests it). The backend object is backends.TritonBackend; the
kernels are imported when a call first runs.

    routing.py       logits -> (weights, ids)                     one launch
    plan.py          (ids, weights) -> Plan | FoldedPlan          four launches
    backend.py       the experts stage's host side, both layouts: forward and backward, the
                     schedules and every GEMM and combine launch (kernel bodies in the files
                     below)
    gemm1_swiglu.py  GEMM-1 with SwiGLU in its epilogue           m-grouped, rows gathered from x
    gemm_m_grouped.py  GEMM-2 and the data gradients (dGEMM-2 + SwiGLU', dGEMM-1), m-grouped
    gemm_k_grouped.py  weight gradients (K = rows of a problem), k-grouped
    gemm_common.py   the row-block lookup, K loops and numerics every grouped GEMM shares
    combine.py       per-token sum of rows (y, and dx in the backward)
    gemm_folded.py, wgrad_folded.py   the folded adjugate layout's kernels
    config.py, tune.py, codegen_check.py   tile configurations and launch numerics, their
                     tuner, an sm_90 AOT check
"""
import os

# Under the interpreter the kernels run on CPU tensors (and bf16 dots are upcast: gemm_common).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
