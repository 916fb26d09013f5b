"""The `cuda` backend: CUTLASS 3.x grouped GEMMs for Hopper (sm_90a) and CUDA row kernels.

    ext.py          the extension grove_kernels._C (built from csrc/) and thin op wrappers
    backend.py      the experts stage: forward and backward dataflow over those ops (the
                    sections layout; the folded one in folded.py)
    packed.py       the packed weight copy [w2 | a2] of the folded layout's GEMM-2

settings.fused_gemm1 (GROVE_CUDA_FUSE_SWIGLU=1 | 0 | auto, grove_kernels.settings.set_fuse_swiglu;
"auto", the default, follows settings.FUSE_SWIGLU_AUTO): an inference forward's GEMM-1 runs with
SwiGLU in its epilogue, reading w1 / a1 as they are (each tile loads its gate and up rows as two
TMA boxes: csrc/gemm/gate_up_mainloop.cuh), where the output width is a multiple of 8. The
folded layout's GEMM-2 reads a packed [w2 | a2] copy kept per weight tensor while its version is
unchanged, in training too (repacked when an optimizer step bumps the versions): a write torch
does not version (w.data.copy_) is not seen; call release_packed_weights() after one.
"""
from .ext import DTYPES, build_info, is_available, is_built  # noqa: F401

def release_packed_weights():
    """Drop the packed weight copies ([w2 | a2] for the folded GEMM-2), including those pinned
    for captured CUDA graphs: call it after changing weights in a way torch does not version,
    and only once no graph captured with the old copies will replay."""
    from .packed import packed_down

    packed_down.clear()
