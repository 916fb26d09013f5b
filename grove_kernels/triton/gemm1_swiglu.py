"""GEMM-1 with the SwiGLU epilogue, over all expert and adjugate problems in one launch.

    x [T, H] --rows gathered through row_token--> xr [BM, H]
    experts   (p < E):  hg = xr @ w1[p, :I]^T,   hu = xr @ w1[p, I:]^T    N = I
    adjugates (p >= E): hg = xr @ a1[g, :Ia]^T,  hu = xr @ a1[g, Ia:]^T  N = Ia
    z = silu(hg) * hu  -> z_e [R_e, I] / z_a [R_a, Ia]   (optionally hg, hu -> h [R, 2N])

A program owns BM rows of one problem and BN columns of its gate AND the matching BN
columns of its up half: two accumulators, so SwiGLU needs no repacked weights and no second
pass. Rows are gathered from x by token (no permuted copy of x). fp32 accumulation.
"""
import triton
import triton.language as tl

from .gemm_common import gate_up_loop, round_to, row_block


@triton.jit
def _gemm1_tile(x_ptr, stride_xt, row_token_ptr, row_weight_ptr, rows, row_ok, w_ptr, s_n, N,
                z_ptr, h_ptr, row0, K, pid_n,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                WEIGHT_ON_INPUT: tl.constexpr, STORE_H: tl.constexpr, INTERPRET: tl.constexpr,
                IEEE: tl.constexpr):
    n0 = pid_n * BN
    if n0 < N:
        token = tl.load(row_token_ptr + rows, mask=row_ok, other=0)
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < N
        ks = tl.arange(0, BK)
        a_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xt + ks[None, :]
        g_ptrs = w_ptr + cols[None, :].to(tl.int64) * s_n + ks[:, None]
        u_ptrs = g_ptrs + N.to(tl.int64) * s_n
        acc_g, acc_u = gate_up_loop(a_ptrs, g_ptrs, u_ptrs, BK, row_ok, col_ok, K, BM, BN, BK,
                                    INTERPRET, IEEE)

        if WEIGHT_ON_INPUT:
            # (w·x) W = w·(x W): scaling the fp32 accumulators keeps x unrounded.
            w = tl.load(row_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            acc_g = acc_g * w[:, None]
            acc_u = acc_u * w[:, None]
        out_rows = (rows - row0).to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        if STORE_H:
            h_ptrs = h_ptr + out_rows[:, None] * (2 * N) + cols[None, :]
            tl.store(h_ptrs, round_to(acc_g, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
            tl.store(h_ptrs + N, round_to(acc_u, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
        z = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(z_ptr + out_rows[:, None] * N + cols[None, :],
                 round_to(z, z_ptr.dtype.element_ty, INTERPRET), mask=mask)


# The expert and adjugate branches each inline the whole tile: no value flows out of them, so
# strides keep Triton's specializations (stride 1, multiples of 16) that vectorize the loads.
@triton.jit
def _gemm1_swiglu_kernel(
    x_ptr, stride_xt,
    row_token_ptr, row_weight_ptr,
    block_offsets, prob_start, prob_count, P, E,
    w1_ptr, s_w1_p, s_w1_n, N_E,
    a1_ptr, s_a1_p, s_a1_n, N_A,
    ze_ptr, za_ptr, he_ptr, ha_ptr, ROWS_E,
    K,
    P_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, STORE_H: tl.constexpr, INTERPRET: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(1)
    p, rows, row_ok = row_block(block_offsets, prob_start, prob_count, P, P_POW2, BM)
    if p < E:
        _gemm1_tile(x_ptr, stride_xt, row_token_ptr, row_weight_ptr, rows, row_ok,
                    w1_ptr + p.to(tl.int64) * s_w1_p, s_w1_n, N_E, ze_ptr, he_ptr, 0, K, pid_n,
                    BM, BN, BK, WEIGHT_ON_INPUT, STORE_H, INTERPRET, IEEE)
    elif p < P:
        _gemm1_tile(x_ptr, stride_xt, row_token_ptr, row_weight_ptr, rows, row_ok,
                    a1_ptr + (p - E).to(tl.int64) * s_a1_p, s_a1_n, N_A, za_ptr, ha_ptr, ROWS_E,
                    K, pid_n, BM, BN, BK, WEIGHT_ON_INPUT, STORE_H, INTERPRET, IEEE)
