"""The m-grouped GEMMs of the folded adjugate layout: expert problems only, each expert's leader
rows (those that also carry their group's adjugate) first, [off[e], leader_ends[e]).

Schedule. Row blocks of BM rows are numbered expert by expert (folded_schedule: block_offsets
[E+1], the real blocks block_offsets[E] on the device, with no host read). An *item* is (row
block, expert N tile): the expert N tiles only. A row block is a *leader block* when its first
row is below leader_ends[e]; there, the item with N tile n also computes adjugate N tiles n,
n + n_e, n + 2 n_e, ... (n_e = expert tiles, n_a = adjugate tiles) after its expert tile, over
the same gathered rows. So adjugate tiles run only inside items that already have expert work
(under coactive routing about half the row blocks have no leaders). A device-built list of
(row block, tile) items was the alternative; its bound (T·min(k, G) leader rows) is loose
under coactive routing. On leader blocks the items with n < n_a do two tiles (grove-33b,
BN = 64: tiles 0 and 1 of 12). The x rows of a row block are gathered from memory once per
block (every N tile re-reads them from L2); adjugate rows are never gathered a second time.

Two launch shapes (grid(); config.persistent_programs, GROVE_TRITON_SCHEDULE):
    persistent (default)  min(programs, bound · n_grid) programs, program i running items
                          i, i + #programs, ... < block_offsets[E] · n_grid (read on the
                          device): every program has work whenever there are at least as
                          many items as programs. Item t = (row block t // n_grid, N tile
                          t % n_grid): the N tiles of a row block run side by side (its x
                          rows read from HBM once, then from L2) and the concurrently running
                          items span whole experts' row blocks (each weight tile of an
                          expert read once and reused from L2 by its other row blocks).
    tiles                 grid (bound = cdiv(R, BM) + E, n_grid), one item per program:
                          programs past the last real block return at once (idle).

Launches (A row r, B_p the weight of expert p, g = p // S; rows r of p; "lead" rows: r <
leader_ends[p]; every row x stride product in int64; each operand's strides passed on their
own, so a unit stride is a per-operand specialization):

    folded_gemm1      reads x[row_token] [BM, H], w1[p] (2I x H), a1[g] (2Ia x H) on leader
                      blocks -> z [R, I + Ia] = [z_e | z_a] (z_a on lead rows only), with
                      STORE_H also h [R, 2I + 2Ia] = [gate_e | up_e | gate_a | up_a]
    folded_k_concat   out[r] = sa_r (A[r, :K_E] @ B_p) + sb_r (A[r, A_OFF:A_OFF + K_A] @ B'_g)
                      the second product on lead rows of leader blocks only;
                      GEMM-2:  A = z, B = w2[p]^T, B' = a2[g]^T, sa = row_weight,
                               sb = leader_weight -> o [R, H]
                      dGEMM-1: A = dh, B = w1[p], B' = a1[g], no scales -> dx rows [R, H]
    folded_dgemm2     g = dY[row_token] @ w2[p] (N = I), on leader blocks also dY @ a2[g]
                      (N = Ia); reads h; writes dh [R, 2I + 2Ia] (SwiGLU backward with the
                      scale w or λΣw) and the partials Σ_n g·z per (N tile, row): d row weight
                      [n_e, R] and d leader weight [n_a, R], summed by the caller (no atomics)

GEMM-2's scales. Each part is accumulated in fp32 on its own, then o = w·acc_e + λΣw·acc_a in
fp32 and rounded once to the output dtype. The float64 value differs from this by the fp32
rounding of the two products and their sum (~3 ulp of fp32) plus one rounding to the output
dtype; the sections layout rounded each part to the output dtype and the combine added the
two in fp32, so the folded output carries one rounding to the output dtype fewer per leader
row (for bf16 output: ~2^-9 relative per (t, g) less error). Pre-scaling z by w would put the
scale before the MMA and add a rounding of z·w to the operand dtype: not done.
"""
import triton
import triton.language as tl

from .gemm_common import gate_up_loop, k_loop, locate_block, round_to


@triton.jit
def _leader_block(block, block_offsets, prob_start, prob_count, leader_ends, E,
                  P_POW2: tl.constexpr, BM: tl.constexpr):
    """(expert, rows [BM], row_ok, lead_ok, leader block?) of row block `block`."""
    p, m0, m_end = locate_block(block, block_offsets, prob_start, prob_count, E, P_POW2, BM)
    rows = m0 + tl.arange(0, BM)
    row_ok = rows < m_end
    lead_end = tl.load(leader_ends + tl.minimum(p, E - 1))
    return p, rows, row_ok, row_ok & (rows < lead_end), m0 < lead_end


# ---- GEMM-1 + SwiGLU ---------------------------------------------------------------------

@triton.jit
def _gemm1_tile(x_ptr, stride_xt, token, rows, row_ok, w_ptr, s_n, s_k, N, z_ptr, stride_z,
                z_col, h_ptr, stride_h, h_col, K, tile,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STORE_H: tl.constexpr,
                INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    cols = tile * BN + tl.arange(0, BN)
    col_ok = cols < N
    ks = tl.arange(0, BK)
    a_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :]
    g_ptrs = w_ptr + cols[None, :].to(tl.int64) * s_n + ks[:, None] * s_k
    u_ptrs = w_ptr + (cols[None, :] + N).to(tl.int64) * s_n + ks[:, None] * s_k
    acc_g, acc_u = gate_up_loop(a_ptrs, g_ptrs, u_ptrs, BK * s_k, row_ok, col_ok, K, BM, BN, BK,
                                INTERPRET, IEEE)
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    if STORE_H:
        h_ptrs = h_ptr + r64 * stride_h + h_col + cols[None, :]
        tl.store(h_ptrs, round_to(acc_g, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(h_ptrs + N, round_to(acc_u, h_ptr.dtype.element_ty, INTERPRET), mask=mask)
    z = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(z_ptr + r64 * stride_z + z_col + cols[None, :],
             round_to(z, z_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _gemm1_block(x_ptr, stride_xt, row_token_ptr, p, rows, row_ok, lead_ok, leader_block, n, S,
                 w1_ptr, s_w1_p, s_w1_n, s_w1_k, I, a1_ptr, s_a1_p, s_a1_n, s_a1_k, IA,
                 z_ptr, stride_z, h_ptr, stride_h, K, n_e, n_a,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STORE_H: tl.constexpr,
                 INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """Expert N tile n of a row block, then on a leader block adjugate tiles n, n + n_e, ..."""
    token = tl.load(row_token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    _gemm1_tile(x_ptr, stride_xt, token, rows, row_ok, w1_ptr + p.to(tl.int64) * s_w1_p,
                s_w1_n, s_w1_k, I, z_ptr, stride_z, 0, h_ptr, stride_h, 0, K, n,
                BM, BN, BK, STORE_H, INTERPRET, IEEE)
    if leader_block:
        a1_g = a1_ptr + (p // S).to(tl.int64) * s_a1_p
        for tile in range(n, n_a, n_e):
            _gemm1_tile(x_ptr, stride_xt, token, rows, lead_ok, a1_g, s_a1_n, s_a1_k, IA,
                        z_ptr, stride_z, I, h_ptr, stride_h, 2 * I, K, tile,
                        BM, BN, BK, STORE_H, INTERPRET, IEEE)


@triton.jit
def _folded_gemm1_kernel(
    x_ptr, stride_xt, row_token_ptr, block_offsets, prob_start, prob_count, leader_ends, E, S,
    w1_ptr, s_w1_p, s_w1_n, s_w1_k, I,
    a1_ptr, s_a1_p, s_a1_n, s_a1_k, IA,
    z_ptr, stride_z, h_ptr, stride_h, K, n_e, n_a,
    P_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    STORE_H: tl.constexpr, PERSISTENT: tl.constexpr, INTERPRET: tl.constexpr,
    IEEE: tl.constexpr,
):
    if PERSISTENT:
        for t in range(tl.program_id(0), tl.load(block_offsets + E) * n_e, tl.num_programs(0)):
            n = t % n_e
            p, rows, row_ok, lead_ok, leader_block = _leader_block(
                t // n_e, block_offsets, prob_start, prob_count, leader_ends, E, P_POW2, BM)
            _gemm1_block(x_ptr, stride_xt, row_token_ptr, p, rows, row_ok, lead_ok,
                         leader_block, n, S, w1_ptr, s_w1_p, s_w1_n, s_w1_k, I,
                         a1_ptr, s_a1_p, s_a1_n, s_a1_k, IA, z_ptr, stride_z, h_ptr, stride_h,
                         K, n_e, n_a, BM, BN, BK, STORE_H, INTERPRET, IEEE)
    else:
        p, rows, row_ok, lead_ok, leader_block = _leader_block(
            tl.program_id(0), block_offsets, prob_start, prob_count, leader_ends, E, P_POW2, BM)
        if p < E:
            _gemm1_block(x_ptr, stride_xt, row_token_ptr, p, rows, row_ok, lead_ok,
                         leader_block, tl.program_id(1), S, w1_ptr, s_w1_p, s_w1_n, s_w1_k, I,
                         a1_ptr, s_a1_p, s_a1_n, s_a1_k, IA, z_ptr, stride_z, h_ptr, stride_h,
                         K, n_e, n_a, BM, BN, BK, STORE_H, INTERPRET, IEEE)


# ---- K-concatenated: GEMM-2 and dGEMM-1 ------------------------------------------------------

@triton.jit
def _k_loop(acc, a_ptr, stride_a, a_col, rows, row_ok, K, b_ptr, s_k, s_n, cols, col_ok,
            BK: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_a + a_col + ks[None, :]
    b_ptrs = b_ptr + ks[:, None].to(tl.int64) * s_k + cols[None, :].to(tl.int64) * s_n
    return k_loop(acc, a_ptrs, b_ptrs, BK * s_k, row_ok, col_ok, K, BK, INTERPRET, IEEE)


@triton.jit
def _k_concat_block(a_ptr, stride_a, K_E, K_A, A_OFF, row_weight_ptr, leader_weight_ptr,
                    p, rows, row_ok, lead_ok, leader_block, n, S,
                    be_ptr, s_be_p, s_be_k, s_be_n, ba_ptr, s_ba_p, s_ba_k, s_ba_n, N,
                    out_ptr, stride_o, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    ROW_WEIGHT_OUT: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    cols = n * BN + tl.arange(0, BN)
    col_ok = cols < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _k_loop(acc, a_ptr, stride_a, 0, rows, row_ok, K_E,
                  be_ptr + p.to(tl.int64) * s_be_p, s_be_k, s_be_n, cols, col_ok, BK,
                  INTERPRET, IEEE)
    if ROW_WEIGHT_OUT:
        w = tl.load(row_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    if leader_block:
        b_g = ba_ptr + (p // S).to(tl.int64) * s_ba_p
        if ROW_WEIGHT_OUT:
            acc_a = tl.zeros((BM, BN), dtype=tl.float32)
            acc_a = _k_loop(acc_a, a_ptr, stride_a, A_OFF, rows, lead_ok, K_A, b_g, s_ba_k,
                            s_ba_n, cols, col_ok, BK, INTERPRET, IEEE)
            lw = tl.load(leader_weight_ptr + rows, mask=lead_ok, other=0.0).to(tl.float32)
            acc += acc_a * lw[:, None]
        else:
            acc = _k_loop(acc, a_ptr, stride_a, A_OFF, rows, lead_ok, K_A, b_g, s_ba_k,
                          s_ba_n, cols, col_ok, BK, INTERPRET, IEEE)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _folded_k_concat_kernel(
    a_ptr, stride_a, K_E, K_A, A_OFF, row_weight_ptr, leader_weight_ptr,
    block_offsets, prob_start, prob_count, leader_ends, E, S,
    be_ptr, s_be_p, s_be_k, s_be_n, ba_ptr, s_ba_p, s_ba_k, s_ba_n, N, n_grid,
    out_ptr, stride_o,
    P_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ROW_WEIGHT_OUT: tl.constexpr, PERSISTENT: tl.constexpr, INTERPRET: tl.constexpr,
    IEEE: tl.constexpr,
):
    if PERSISTENT:
        for t in range(tl.program_id(0), tl.load(block_offsets + E) * n_grid,
                       tl.num_programs(0)):
            n = t % n_grid
            p, rows, row_ok, lead_ok, leader_block = _leader_block(
                t // n_grid, block_offsets, prob_start, prob_count, leader_ends, E, P_POW2, BM)
            _k_concat_block(a_ptr, stride_a, K_E, K_A, A_OFF, row_weight_ptr,
                            leader_weight_ptr, p, rows, row_ok, lead_ok, leader_block, n, S,
                            be_ptr, s_be_p, s_be_k, s_be_n, ba_ptr, s_ba_p, s_ba_k, s_ba_n, N,
                            out_ptr, stride_o, BM, BN, BK, ROW_WEIGHT_OUT, INTERPRET, IEEE)
    else:
        p, rows, row_ok, lead_ok, leader_block = _leader_block(
            tl.program_id(0), block_offsets, prob_start, prob_count, leader_ends, E, P_POW2, BM)
        if p < E:
            _k_concat_block(a_ptr, stride_a, K_E, K_A, A_OFF, row_weight_ptr,
                            leader_weight_ptr, p, rows, row_ok, lead_ok, leader_block,
                            tl.program_id(1), S, be_ptr, s_be_p, s_be_k, s_be_n, ba_ptr,
                            s_ba_p, s_ba_k, s_ba_n, N, out_ptr, stride_o, BM, BN, BK,
                            ROW_WEIGHT_OUT, INTERPRET, IEEE)


# ---- dGEMM-2 + SwiGLU backward ---------------------------------------------------------------

@triton.jit
def _dgemm2_tile(dy_ptr, stride_dy, token, rows, row_ok, weight_ptr, b_ptr, s_k, s_n, N,
                 h_ptr, stride_h, h_col, dh_ptr, part_ptr, R, K, tile,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
                 IEEE: tl.constexpr):
    cols = tile * BN + tl.arange(0, BN)
    col_ok = cols < N
    acc = _k_loop(tl.zeros((BM, BN), dtype=tl.float32), dy_ptr, stride_dy, 0, token, row_ok, K,
                  b_ptr, s_k, s_n, cols, col_ok, BK, INTERPRET, IEEE)  # dY rows by token
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    h_ptrs = h_ptr + r64 * stride_h + h_col + cols[None, :]
    hg = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    hu = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(hg)
    silu = hg * sig
    # Σ_n g·z over this tile (masked columns load 0): the weight's gradient partial.
    # tile is a plain int under the interpreter: widen it by addition.
    tl.store(part_ptr + (tl.full([], 0, tl.int64) + tile) * R + rows,
             tl.sum(acc * silu * hu, axis=1), mask=row_ok)
    w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    dz = acc * w[:, None]
    d_gate = dz * hu * sig * (1.0 + hg * (1.0 - sig))
    dh_ptrs = dh_ptr + r64 * stride_h + h_col + cols[None, :]
    tl.store(dh_ptrs, round_to(d_gate, dh_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(dh_ptrs + N, round_to(dz * silu, dh_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _dgemm2_block(dy_ptr, stride_dy, row_token_ptr, row_weight_ptr, leader_weight_ptr,
                  p, rows, row_ok, lead_ok, leader_block, n, S,
                  w2_ptr, s_w2_p, s_w2_k, s_w2_n, I, a2_ptr, s_a2_p, s_a2_k, s_a2_n, IA,
                  h_ptr, stride_h, dh_ptr, part_e_ptr, part_a_ptr, R, K, n_e, n_a,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    token = tl.load(row_token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    _dgemm2_tile(dy_ptr, stride_dy, token, rows, row_ok, row_weight_ptr,
                 w2_ptr + p.to(tl.int64) * s_w2_p, s_w2_k, s_w2_n, I, h_ptr, stride_h, 0,
                 dh_ptr, part_e_ptr, R, K, n, BM, BN, BK, INTERPRET, IEEE)
    if leader_block:
        a2_g = a2_ptr + (p // S).to(tl.int64) * s_a2_p
        for tile in range(n, n_a, n_e):
            _dgemm2_tile(dy_ptr, stride_dy, token, rows, lead_ok, leader_weight_ptr, a2_g,
                         s_a2_k, s_a2_n, IA, h_ptr, stride_h, 2 * I, dh_ptr, part_a_ptr, R,
                         K, tile, BM, BN, BK, INTERPRET, IEEE)


@triton.jit
def _folded_dgemm2_kernel(
    dy_ptr, stride_dy, row_token_ptr, row_weight_ptr, leader_weight_ptr,
    block_offsets, prob_start, prob_count, leader_ends, E, S,
    w2_ptr, s_w2_p, s_w2_k, s_w2_n, I, a2_ptr, s_a2_p, s_a2_k, s_a2_n, IA,
    h_ptr, stride_h, dh_ptr, part_e_ptr, part_a_ptr, R, K, n_e, n_a,
    P_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PERSISTENT: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    if PERSISTENT:
        for t in range(tl.program_id(0), tl.load(block_offsets + E) * n_e, tl.num_programs(0)):
            n = t % n_e
            p, rows, row_ok, lead_ok, leader_block = _leader_block(
                t // n_e, block_offsets, prob_start, prob_count, leader_ends, E, P_POW2, BM)
            _dgemm2_block(dy_ptr, stride_dy, row_token_ptr, row_weight_ptr, leader_weight_ptr,
                          p, rows, row_ok, lead_ok, leader_block, n, S,
                          w2_ptr, s_w2_p, s_w2_k, s_w2_n, I, a2_ptr, s_a2_p, s_a2_k, s_a2_n,
                          IA, h_ptr, stride_h, dh_ptr, part_e_ptr, part_a_ptr, R, K, n_e, n_a,
                          BM, BN, BK, INTERPRET, IEEE)
    else:
        p, rows, row_ok, lead_ok, leader_block = _leader_block(
            tl.program_id(0), block_offsets, prob_start, prob_count, leader_ends, E, P_POW2, BM)
        if p < E:
            _dgemm2_block(dy_ptr, stride_dy, row_token_ptr, row_weight_ptr, leader_weight_ptr,
                          p, rows, row_ok, lead_ok, leader_block, tl.program_id(1), S,
                          w2_ptr, s_w2_p, s_w2_k, s_w2_n, I, a2_ptr, s_a2_p, s_a2_k, s_a2_n,
                          IA, h_ptr, stride_h, dh_ptr, part_e_ptr, part_a_ptr, R, K, n_e, n_a,
                          BM, BN, BK, INTERPRET, IEEE)
