"""The k-grouped GEMM of the weight gradients: per-problem GEMMs whose reduction runs over the
problem's rows (variable K = rows), experts and adjugates in one launch.

    dW_p[m, n] = Σ_{r in p} (sa_r · A[ra(r), m]) · (sb_r · B[rb(r), n])

    use      A (M)                               B (N)                       dW_p
    dW2/dA2  dY[token] · row weight  (H)         z rows (I | Ia)             [H, I | Ia]
    dW1/dA1  dh rows (2I | 2Ia)                  x[token] (· w on input) (H) [2I | 2Ia, H]

One program per (problem, M tile, N tile) walks its rows in a fixed order: deterministic,
no atomics, and problems with no rows write zeros (nothing is left uninitialized).
"""
import triton
import triton.language as tl

from .gemm_common import mma, round_to


@triton.jit
def _k_grouped_tile(a_ptr, stride_a_gather, b_ptr, stride_b_gather, row_token_ptr,
                    row_weight_ptr, start, end, row0, o_ptr, M, N, pid_m, pid_n,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, ROW_WEIGHT_A: tl.constexpr,
                    ROW_WEIGHT_B: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    if (pid_m * BM < M) & (pid_n * BN < N):
        m_idx = pid_m * BM + tl.arange(0, BM)
        n_idx = pid_n * BN + tl.arange(0, BN)
        m_ok = m_idx < M
        n_ok = n_idx < N
        ks = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(start, end, BK):
            rows = r0 + ks
            r_ok = rows < end
            token = tl.load(row_token_ptr + rows, mask=r_ok, other=0).to(tl.int64)
            local = (rows - row0).to(tl.int64)
            if GATHER_A:
                a_ptrs = a_ptr + token[None, :] * stride_a_gather + m_idx[:, None]
            else:
                a_ptrs = a_ptr + local[None, :] * M + m_idx[:, None]
            a = tl.load(a_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BK]
            if GATHER_B:
                b_ptrs = b_ptr + token[:, None] * stride_b_gather + n_idx[None, :]
            else:
                b_ptrs = b_ptr + local[:, None] * N + n_idx[None, :]
            b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
            if ROW_WEIGHT_A or ROW_WEIGHT_B:
                w = tl.load(row_weight_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
                # The scaled operand is rounded back to its dtype, as the forward's rows were.
                if ROW_WEIGHT_A:
                    a = round_to(a.to(tl.float32) * w[None, :], a.dtype, INTERPRET)
                if ROW_WEIGHT_B:
                    b = round_to(b.to(tl.float32) * w[:, None], b.dtype, INTERPRET)
            acc = mma(acc, a, b, INTERPRET, IEEE)
        o_ptrs = o_ptr + m_idx[:, None].to(tl.int64) * N + n_idx[None, :]
        tl.store(o_ptrs, round_to(acc, o_ptr.dtype.element_ty, INTERPRET),
                 mask=m_ok[:, None] & n_ok[None, :])


# Each branch inlines the whole tile (see gemm1_swiglu.py): strides keep their specializations.
@triton.jit
def _gemm_k_grouped_kernel(
    ae_ptr, aa_ptr, stride_a_gather, be_ptr, ba_ptr, stride_b_gather,
    row_token_ptr, row_weight_ptr, prob_start, prob_count, E,
    oe_ptr, s_oe_p, M_E, N_E,
    oa_ptr, s_oa_p, M_A, N_A, ROWS_E,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, ROW_WEIGHT_A: tl.constexpr,
    ROW_WEIGHT_B: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    p = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(prob_start + p)
    end = start + tl.load(prob_count + p)
    if p < E:
        _k_grouped_tile(ae_ptr, stride_a_gather, be_ptr, stride_b_gather, row_token_ptr,
                        row_weight_ptr, start, end, 0, oe_ptr + p.to(tl.int64) * s_oe_p, M_E,
                        N_E, pid_m, pid_n, BM, BN, BK, GATHER_A, GATHER_B, ROW_WEIGHT_A,
                        ROW_WEIGHT_B, INTERPRET, IEEE)
    else:
        _k_grouped_tile(aa_ptr, stride_a_gather, ba_ptr, stride_b_gather, row_token_ptr,
                        row_weight_ptr, start, end, ROWS_E,
                        oa_ptr + (p - E).to(tl.int64) * s_oa_p, M_A, N_A, pid_m, pid_n, BM, BN,
                        BK, GATHER_A, GATHER_B, ROW_WEIGHT_A, ROW_WEIGHT_B, INTERPRET, IEEE)
