"""Per-token combine: y_t = Σ_j rows[token_rows[t, j]] over the token's real rows.

    rows [R, H] (row weights already applied), token_rows / token_mask [T, c] -> y [T, H]

The c entries (k expert slots, then k adjugate slots) are summed in fixed order in fp32:
deterministic, no atomics. The same kernel sums dX rows into dX in the backward.
"""
import triton
import triton.language as tl

from .gemm_common import round_to


@triton.jit
def _combine_rows_kernel(rows_ptr, stride_r, token_rows_ptr, token_mask_ptr, out_ptr, stride_o,
                         H, C: tl.constexpr, BH: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    col_ok = cols < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(C):
        real = tl.load(token_mask_ptr + t * C + j) != 0
        if real:
            r = tl.load(token_rows_ptr + t * C + j)
            acc += tl.load(rows_ptr + r * stride_r + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, round_to(acc, out_ptr.dtype.element_ty, INTERPRET),
             mask=col_ok)
