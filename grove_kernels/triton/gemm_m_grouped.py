"""The m-grouped GEMM (a problem's rows are its M) over all expert and adjugate problems in
one launch, with the epilogues of GEMM-2 and of the two backward data-gradient GEMMs.

    out[r, :] = epilogue( A[r] @ B_p )      r a row of problem p (expert p < E, else adjugate)

    use                 A (K)                         B_p                  out
    GEMM-2 forward      z rows (I | Ia)               w2[p]^T / a2[g]^T    o [R, H] · row weight
    dGEMM-2 + SwiGLU'   dY[token] (H)                 w2[p]   / a2[g]      dh [R_s, 2N], Σ g·z
    dGEMM-1             dh rows (2I | 2Ia)            w1[p]   / a1[g]      dx rows [R, H]

The SwiGLU-backward epilogue takes g = dY·W2 (unweighted), h = (hg, hu) kept by the training
forward, and writes dh = (w·g·hu·silu'(hg), w·g·silu(hg)); it also writes the
per-tile partial Σ_n g·z, whose sum over tiles is d(row weight) = <dY_t, o_r / w_r>.
Partials instead of atomics keep that sum deterministic.
"""
import triton
import triton.language as tl

from .gemm_common import k_loop, round_to, row_block

# The epilogues (the kernel's EPILOGUE constexpr).
STORE = tl.constexpr(0)  # out = acc · row weight (ROW_WEIGHT_OUT) or acc
SWIGLU_BWD = tl.constexpr(1)  # dh from g = acc and the saved h; partial Σ_n g·z
DOT_X = tl.constexpr(2)  # partial Σ_n acc·x[token] (router weight applied on the input), then scale


@triton.jit
def _m_grouped_tile(a_ptr, K, stride_a_gather, row_token_ptr, row_weight_ptr, rows, row_ok,
                    row0, b_ptr, s_b, N, o_ptr, stride_o, h_ptr, x_ptr, stride_xt, part_ptr, R,
                    pid_n, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    B_K_CONTIG: tl.constexpr, GATHER_A: tl.constexpr, OUT_SHARED: tl.constexpr,
                    ROW_WEIGHT_OUT: tl.constexpr, EPILOGUE: tl.constexpr, INTERPRET: tl.constexpr,
                    IEEE: tl.constexpr):
    n0 = pid_n * BN
    if n0 < N:
        token = tl.load(row_token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        local = (rows - row0).to(tl.int64)
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < N
        ks = tl.arange(0, BK)
        if GATHER_A:
            a_ptrs = a_ptr + token[:, None] * stride_a_gather + ks[None, :]
        else:
            a_ptrs = a_ptr + local[:, None] * K + ks[None, :]
        if B_K_CONTIG:
            b_ptrs = b_ptr + ks[:, None] + cols[None, :].to(tl.int64) * s_b
            b_step = BK
        else:
            b_ptrs = b_ptr + ks[:, None].to(tl.int64) * s_b + cols[None, :]
            b_step = BK * s_b
        acc = k_loop(tl.zeros((BM, BN), dtype=tl.float32), a_ptrs, b_ptrs, b_step, row_ok,
                     col_ok, K, BK, INTERPRET, IEEE)

        mask = row_ok[:, None] & col_ok[None, :]
        if ROW_WEIGHT_OUT:
            w = tl.load(row_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        else:
            w = tl.full((BM,), 1.0, tl.float32)
        if EPILOGUE == SWIGLU_BWD:
            h_ptrs = h_ptr + local[:, None] * (2 * N) + cols[None, :]
            hg = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            hu = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(hg)
            silu = hg * sig
            # Σ_n g·z over this tile (masked columns load 0): d(row weight) partial.
            tl.store(part_ptr + pid_n.to(tl.int64) * R + rows, tl.sum(acc * silu * hu, axis=1), mask=row_ok)
            dz = acc * w[:, None]
            d_gate = dz * hu * sig * (1.0 + hg * (1.0 - sig))
            out_ptrs = o_ptr + local[:, None] * (2 * N) + cols[None, :]
            tl.store(out_ptrs, round_to(d_gate, o_ptr.dtype.element_ty, INTERPRET), mask=mask)
            tl.store(out_ptrs + N, round_to(dz * silu, o_ptr.dtype.element_ty, INTERPRET),
                     mask=mask)
        else:
            if EPILOGUE == DOT_X:
                xv = tl.load(x_ptr + token[:, None] * stride_xt + cols[None, :], mask=mask,
                             other=0.0)
                tl.store(part_ptr + pid_n.to(tl.int64) * R + rows, tl.sum(acc * xv.to(tl.float32), axis=1),
                         mask=row_ok)
            acc = acc * w[:, None]
            if OUT_SHARED:
                out_ptrs = o_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :]
            else:
                out_ptrs = o_ptr + local[:, None] * N + cols[None, :]
            tl.store(out_ptrs, round_to(acc, o_ptr.dtype.element_ty, INTERPRET), mask=mask)


# Each branch inlines the whole tile (see gemm1_swiglu.py): strides keep their specializations.
@triton.jit
def _gemm_m_grouped_kernel(
    ae_ptr, aa_ptr, K_E, K_A, stride_a_gather,
    row_token_ptr, row_weight_ptr,
    block_offsets, prob_start, prob_count, P, E,
    be_ptr, s_be_p, s_be, N_E,
    ba_ptr, s_ba_p, s_ba, N_A,
    oute_ptr, outa_ptr, stride_out_shared, ROWS_E,
    he_ptr, ha_ptr, x_ptr, stride_xt, part_ptr, R,
    P_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    B_K_CONTIG: tl.constexpr, GATHER_A: tl.constexpr, OUT_SHARED: tl.constexpr,
    ROW_WEIGHT_OUT: tl.constexpr, EPILOGUE: tl.constexpr, INTERPRET: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(1)
    p, rows, row_ok = row_block(block_offsets, prob_start, prob_count, P, P_POW2, BM)
    if p < E:
        _m_grouped_tile(ae_ptr, K_E, stride_a_gather, row_token_ptr, row_weight_ptr, rows,
                        row_ok, 0, be_ptr + p.to(tl.int64) * s_be_p, s_be, N_E, oute_ptr,
                        stride_out_shared, he_ptr, x_ptr, stride_xt, part_ptr, R, pid_n, BM, BN,
                        BK, B_K_CONTIG, GATHER_A, OUT_SHARED, ROW_WEIGHT_OUT, EPILOGUE, INTERPRET,
                        IEEE)
    elif p < P:
        _m_grouped_tile(aa_ptr, K_A, stride_a_gather, row_token_ptr, row_weight_ptr, rows,
                        row_ok, ROWS_E, ba_ptr + (p - E).to(tl.int64) * s_ba_p, s_ba, N_A,
                        outa_ptr, stride_out_shared, ha_ptr, x_ptr, stride_xt, part_ptr, R,
                        pid_n, BM, BN, BK, B_K_CONTIG, GATHER_A, OUT_SHARED, ROW_WEIGHT_OUT,
                        EPILOGUE, INTERPRET, IEEE)
