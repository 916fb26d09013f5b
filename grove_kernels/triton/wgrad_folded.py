"""The k-grouped weight-gradient GEMM of the folded adjugate layout: per-expert and per-group
reductions over rows (variable K = rows), experts and groups in one launch.

    dW_e[m, n] = Σ_{r in e}                    (s_r A[ra(r), m]) · B[rb(r), n]
    dA_g[m, n] = Σ_{s < S} Σ_{r in lead(gS + s)} (s'_r A[ra(r), A_COL + m]) · B[rb(r), B_COL + n]

lead(e) = [off[e], leader_ends[e]): the adjugate problem of g is the union of the leader
prefixes of its S experts, walked expert by expert, rows in order: deterministic, no atomics.

    use      A (M)                            B (N)                       reads        writes
    dW2/dA2  dY[row_token] · w | λΣw  (H)      z [R, I + Ia] (I | Ia)     dY, z, plan  dw2, da2
    dW1/dA1  dh [R, 2I + 2Ia] (2I | 2Ia)       x[row_token] (H)            dh, x, plan  dw1, da1

Grid: one axis of E·mt_e·nt_e + G·mt_a·nt_a programs (mt, nt: M and N tiles of an expert's /
a group's gradient), each one output tile: no program without work (a problem with no rows
writes its zero tile). Every row x stride product is int64.
"""
import triton
import triton.language as tl

from .gemm_common import mma, round_to


@triton.jit
def _segment(acc, a_ptr, stride_a, a_col, b_ptr, stride_b, b_col, row_token_ptr, weight_ptr,
             start, end, m_idx, m_ok, n_idx, n_ok, BK: tl.constexpr, GATHER_A: tl.constexpr,
             GATHER_B: tl.constexpr, ROW_WEIGHT_A: tl.constexpr, INTERPRET: tl.constexpr,
             IEEE: tl.constexpr):
    ks = tl.arange(0, BK)
    for r0 in range(start, end, BK):
        rows = r0 + ks
        r_ok = rows < end
        r64 = rows.to(tl.int64)
        if GATHER_A or GATHER_B:
            token = tl.load(row_token_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        if GATHER_A:
            a_ptrs = a_ptr + token[None, :] * stride_a + a_col + m_idx[:, None]
        else:
            a_ptrs = a_ptr + r64[None, :] * stride_a + a_col + m_idx[:, None]
        a = tl.load(a_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BK]
        if GATHER_B:
            b_ptrs = b_ptr + token[:, None] * stride_b + b_col + n_idx[None, :]
        else:
            b_ptrs = b_ptr + r64[:, None] * stride_b + b_col + n_idx[None, :]
        b = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        if ROW_WEIGHT_A:
            w = tl.load(weight_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
            # Rounded back to the operand dtype, as the forward's scaled rows would be.
            a = round_to(a.to(tl.float32) * w[None, :], a.dtype, INTERPRET)
        acc = mma(acc, a, b, INTERPRET, IEEE)
    return acc


@triton.jit
def _tile(t, mt, nt, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """(problem, rows [BM], columns [BN], their masks) of tile t of problems of mt x nt tiles."""
    per_problem = mt * nt
    m_idx = (t % per_problem) // nt * BM + tl.arange(0, BM)
    n_idx = t % nt * BN + tl.arange(0, BN)
    return t // per_problem, m_idx, n_idx, m_idx < M, n_idx < N


@triton.jit
def _folded_wgrad_kernel(
    a_ptr, stride_a, A_COL, b_ptr, stride_b, B_COL,
    row_token_ptr, row_weight_ptr, leader_weight_ptr, expert_offsets, leader_ends, E, S,
    oe_ptr, M_E, N_E, mt_e, nt_e, oa_ptr, M_A, N_A, mt_a, nt_a,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr, ROW_WEIGHT_A: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    per_expert = mt_e * nt_e
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if pid < E * per_expert:
        e, m_idx, n_idx, m_ok, n_ok = _tile(pid, mt_e, nt_e, M_E, N_E, BM, BN)
        acc = _segment(acc, a_ptr, stride_a, 0, b_ptr, stride_b, 0, row_token_ptr,
                       row_weight_ptr, tl.load(expert_offsets + e),
                       tl.load(expert_offsets + e + 1), m_idx, m_ok, n_idx, n_ok, BK, GATHER_A,
                       GATHER_B, ROW_WEIGHT_A, INTERPRET, IEEE)
        o_ptrs = (oe_ptr + e.to(tl.int64) * M_E * N_E + m_idx[:, None].to(tl.int64) * N_E
                  + n_idx[None, :])
        tl.store(o_ptrs, round_to(acc, oe_ptr.dtype.element_ty, INTERPRET),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        q = pid - E * per_expert
        g, m_idx, n_idx, m_ok, n_ok = _tile(q, mt_a, nt_a, M_A, N_A, BM, BN)
        for s in range(0, S):
            e = g * S + s
            acc = _segment(acc, a_ptr, stride_a, A_COL, b_ptr, stride_b, B_COL, row_token_ptr,
                           leader_weight_ptr, tl.load(expert_offsets + e),
                           tl.load(leader_ends + e), m_idx, m_ok, n_idx, n_ok, BK, GATHER_A,
                           GATHER_B, ROW_WEIGHT_A, INTERPRET, IEEE)
        o_ptrs = (oa_ptr + g.to(tl.int64) * M_A * N_A + m_idx[:, None].to(tl.int64) * N_A
                  + n_idx[None, :])
        tl.store(o_ptrs, round_to(acc, oa_ptr.dtype.element_ty, INTERPRET),
                 mask=m_ok[:, None] & n_ok[None, :])
