"""The `triton` backend's experts stage, its host side: forward and backward of the Grove / plain
MoE layer over a Plan or a FoldedPlan (protocol in grove_kernels/experts.py), the launches of
the folded layout's kernels (gemm_folded.py, wgrad_folded.py) and of the combine (combine.py).
Kernel bodies live in their files; a folded call enters this file and config.py, once each.

Sections layout (a Plan; one launch per GEMM stage covers both sections):
    GEMM-1 + SwiGLU   x[token] @ w1|a1 -> z_e [R_e, I], z_a [R_a, Ia]   (a training forward also
                      keeps h = (hg, hu) [R, 2N] and z in the activations)
    GEMM-2            z @ w2|a2 · row weight -> o [R, H]
    combine           y_t = Σ_j o[token_rows[t, j]]          -> y [T, H]
  backward (z and h from the activations):
    dGEMM-2 + SwiGLU' dY[token] @ w2|a2 -> dh [R, 2N], d row weight partials
    dW2 / dA2         Σ_rows (w·dY[token])^T z
    dW1 / dA1         Σ_rows dh^T x[token]
    dGEMM-1           dh @ w1|a1 -> dx rows [R, H];  combine -> dx [T, H]

Folded layout (a FoldedPlan: the R = T*k expert rows, each expert's leader rows first; the
schedule of items (row block, N tile) is described in gemm_folded.py):
    folded_gemm1       x[token] @ [w1_e ; a1_g on leader blocks] -> z [R, I + Ia]
                       (a training forward also writes h [R, 2I + 2Ia] into the activations)
    folded_k_concat    o = w·(z_e @ w2_e^T) + λΣw·(z_a @ a2_g^T on lead rows) -> o [R, H]
    combine_rows       y_t = Σ_j o[token_rows[t, j]]  (k rows)                -> y [T, H]
  backward (h and z from the activations):
    folded_dgemm2      dY[token] @ w2_e | a2_g -> dh [R, 2I + 2Ia], d row weight [R],
                       d leader weight [R]
    folded_wgrad       dW2 / dA2 = Σ (w | λΣw · dY[token])^T z;  dW1 / dA1 = Σ dh^T x[token]
                       (dA: the leader rows of the S experts of a group)
    folded_k_concat    dx rows = dh_e @ w1_e + dh_a @ a1_g (lead rows) -> [R, H]
    combine_rows       dx_t = Σ_j dx rows
"""
from typing import NamedTuple

import torch
import triton

from . import (INTERPRET, combine, config as cfg, gemm1_swiglu, gemm_folded, gemm_k_grouped,
               gemm_m_grouped, wgrad_folded)
from .gemm_m_grouped import DOT_X, STORE, SWIGLU_BWD


def _schedule(plan, x, weights):
    if plan.num_rows >= 2 ** 31:  # row indices and the block schedule are 32-bit
        raise ValueError(f"hidden_states: the triton backend indexes plan rows in 32 bits; "
                         f"{plan.num_tokens} tokens make {plan.num_rows} rows (T·(k + "
                         f"min(k, G))), more than 2^31 - 1: split the call")
    I, Ia = weights.intermediate
    conf = cfg.select(plan, x.shape[1], I, Ia, x.dtype)
    rows_bwd, numerics = cfg.swiglu_bwd_rows(conf), cfg.dot_flags(x.dtype)
    return conf, rows_bwd, block_schedule(plan, conf.block_m, numerics)


def _b(w, transpose):
    """Per-problem B_p [K, N] of a weight [P, N, K] (transpose) or [P, K, N], as strides."""
    if w is None:
        return None
    s_p, s_0, s_1 = w.stride()
    return (w, s_p, s_1, s_0) if transpose else (w, s_p, s_0, s_1)


def _b_pair(we, wa, transpose):
    """B operands of both sections (the expert one stands in for an absent adjugate)."""
    be = _b(we, transpose)
    return be, _b(wa, transpose) or be


def forward(x, weights, plan, weight_on_input, y, act):
    if plan.layout == "folded":
        return _folded_forward(x, weights, plan, weight_on_input, y, act)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    conf, _, sched = _schedule(plan, x, weights)
    if act is not None:
        (ze, za), (he, ha) = act.z, act.h
    else:
        ze, za = x.new_empty(plan.num_expert_rows, I), None
        if weights.grove:
            za = x.new_empty(plan.num_adjugate_rows, Ia)
        he = ha = None
    launch_gemm1_swiglu(x, plan, sched, w1, a1, ze, za, he, ha,
                        weight_on_input=weight_on_input, config=conf.gemm1)
    o = x.new_empty(plan.num_rows, H)
    launch_m_grouped(plan, sched, (ze, za), _b_pair(w2, a2, True), (H, H), o,
                     row_weight_out=not weight_on_input, config=conf.rows)
    combine_rows(o, plan, y)


def backward(dy, x, weights, plan, weight_on_input, act, grads):
    if plan.layout == "folded":
        return _folded_backward(dy, x, weights, plan, weight_on_input, act, grads)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    dx, dw1, dw2, da1, da2 = grads
    conf, rows_bwd, sched = _schedule(plan, x, weights)
    z, h = act.z, act.h
    R = plan.num_rows
    dh = (torch.empty_like(h[0]), torch.empty_like(h[1]) if h[1] is not None else None)
    # Zeroed: tiles past an adjugate's narrower N write no partial, and are summed too.
    part = torch.zeros(triton.cdiv(max(I, Ia), rows_bwd.bn), R, dtype=torch.float32,
                       device=x.device)
    n = launch_m_grouped(plan, sched, dy, _b_pair(w2, a2, False), (I, Ia or I), dh,
                         gather_a=True, row_weight_out=not weight_on_input,
                         epilogue=SWIGLU_BWD, h=h, part=part, config=rows_bwd)
    d_row_weight = part[:n].sum(0)

    launch_k_grouped(plan, sched, dy, z, (dw2, da2), gather_a=True,
                     row_weight_a=not weight_on_input, config=conf.wgrad)
    launch_k_grouped(plan, sched, dh, x, (dw1, da1), gather_b=True,
                     row_weight_b=weight_on_input, config=conf.wgrad)

    dx_rows = x.new_empty(R, H)
    b1 = _b_pair(w1, a1, False)
    if weight_on_input:
        part_x = torch.zeros(triton.cdiv(H, conf.rows.bn), R, dtype=torch.float32,
                             device=x.device)
        n = launch_m_grouped(plan, sched, dh, b1, (H, H), dx_rows, row_weight_out=True,
                             epilogue=DOT_X, x=x, part=part_x, config=conf.rows)
        d_row_weight = part_x[:n].sum(0)
    else:
        launch_m_grouped(plan, sched, dh, b1, (H, H), dx_rows, epilogue=STORE,
                         config=conf.rows)
    combine_rows(dx_rows, plan, dx)
    return d_row_weight


class Schedule(NamedTuple):
    """The row blocks of a plan's problems at block height block_m."""
    start: torch.Tensor  # [P] int32: first row of each problem
    count: torch.Tensor  # [P] int32: rows of each problem
    block_offsets: torch.Tensor  # [P+1] int32: first row block of each problem
    bound: int  # grid axis 0: an upper bound on the row blocks
    block_m: int  # BM
    numerics: dict  # the numerics constexprs of the call's GEMMs (config.dot_flags)


def block_schedule(plan, block_m, numerics):
    """The Schedule of `plan` at block height block_m."""
    start, count = plan.problem_start, plan.problem_count
    blocks = (count + block_m - 1) // block_m
    block_offsets = torch.zeros(count.numel() + 1, dtype=torch.int32, device=count.device)
    torch.cumsum(blocks, 0, out=block_offsets[1:])
    bound = triton.cdiv(plan.num_expert_rows, block_m) + triton.cdiv(plan.num_adjugate_rows,
                                                                       block_m) + count.numel()
    return Schedule(start.to(torch.int32), count.to(torch.int32), block_offsets, bound, block_m,
                    numerics)


def operand(t, gather):
    """(expert buffer, adjugate buffer, gather row stride) of a kernel operand: one [T, D]
    tensor read by token (gather), or a pair of per-section row buffers (adjugate may be None)."""
    if gather:
        return t, t, t.stride(0)
    return t[0], t[1] if t[1] is not None else t[0], 0


def launch_gemm1_swiglu(x, plan, sched, w1, a1, ze, za, he=None, ha=None,
                        weight_on_input=False, config=None):
    """Launch GEMM-1 + SwiGLU over every problem of `plan` (sched from block_schedule)."""
    start, count, block_offsets, bound, BM, numerics = sched
    BN, BK, warps, stages = config
    I = w1.shape[1] // 2
    Ia = a1.shape[1] // 2 if a1 is not None else 0
    a1_ = a1 if a1 is not None else w1
    n_tiles = triton.cdiv(max(I, Ia), BN)
    P = start.numel()
    store_h = he is not None
    gemm1_swiglu._gemm1_swiglu_kernel[(bound, n_tiles)](
        x, x.stride(0), plan.row_token, plan.row_weight, block_offsets, start, count, P,
        plan.num_experts,
        w1, w1.stride(0), w1.stride(1), I,
        a1_, a1_.stride(0), a1_.stride(1), Ia,
        ze, za if za is not None else ze, he if store_h else ze,
        (ha if ha is not None else he) if store_h else ze,
        plan.num_expert_rows, x.shape[1],
        P_POW2=max(16, triton.next_power_of_2(P)), BM=BM, BN=BN, BK=BK,
        WEIGHT_ON_INPUT=weight_on_input, STORE_H=store_h, **numerics,
        num_warps=warps, num_stages=stages,
    )


def launch_m_grouped(plan, sched, a, b, n, out, *, gather_a=False, row_weight_out=False,
                     epilogue=STORE, h=None, x=None, part=None, config=None):
    """Launch the m-grouped GEMM.

    a: (a_e, a_a) per-section row buffers, or one [T, K] tensor with gather_a (rows by token).
    b: ((w_e, s_p, s_k, s_n), (w_a, s_p, s_k, s_n)), the per-problem B_p [K, N] as strided views.
    n: (N_e, N_a) output columns per section; out: one [R, N] tensor or (out_e, out_a).
    """
    start, count, block_offsets, bound, BM, numerics = sched
    BN, BK, warps, stages = config
    P = start.numel()
    (be, sbe_p, sbe_k, sbe_n), (ba, sba_p, sba_k, sba_n) = b
    # One of B_p's strides is 1 (weights are contiguous); which one is a compile-time fact
    # shared by both sections, so it must hold for both: a size-1 dimension has stride 1 too
    # (I = 1 makes w2's K stride 1 while a2's, with Ia >= 2, is not).
    k_contig = sbe_k == 1 and sba_k == 1
    if not (k_contig or (sbe_n == 1 and sba_n == 1)):
        raise ValueError(f"weights: the triton backend needs a unit stride shared by both "
                         f"sections, got strides {be.stride()} and {ba.stride()}")
    s_be, s_ba = (sbe_n, sba_n) if k_contig else (sbe_k, sba_k)
    ae, aa, stride_gather = operand(a, gather_a)
    K_E, K_A = ae.shape[1], aa.shape[1]
    shared = not isinstance(out, tuple)
    oute, outa = (out, out) if shared else (out[0], out[1] if out[1] is not None else out[0])
    he, ha = h if h is not None else (oute, oute)
    ha = ha if ha is not None else he
    x_arg = x if x is not None else oute
    part_arg = part if part is not None else oute
    n_tiles = triton.cdiv(max(n), BN)
    gemm_m_grouped._gemm_m_grouped_kernel[(bound, n_tiles)](
        ae, aa, K_E, K_A, stride_gather, plan.row_token, plan.row_weight,
        block_offsets, start, count, P, plan.num_experts,
        be, sbe_p, s_be, n[0], ba, sba_p, s_ba, n[1],
        oute, outa, oute.stride(0) if shared else 0, plan.num_expert_rows,
        he, ha, x_arg, x_arg.stride(0), part_arg, plan.num_rows,
        P_POW2=max(16, triton.next_power_of_2(P)), BM=BM, BN=BN, BK=BK, B_K_CONTIG=k_contig,
        GATHER_A=gather_a, OUT_SHARED=shared, ROW_WEIGHT_OUT=row_weight_out, EPILOGUE=epilogue,
        **numerics, num_warps=warps, num_stages=stages,
    )
    return n_tiles


def launch_k_grouped(plan, sched, a, b, out, *, gather_a=False, gather_b=False,
                     row_weight_a=False, row_weight_b=False, config=None):
    """a, b: per-section row buffers (x_e, x_a) or one gathered [T, D] tensor; out: (dW_e, dW_a)
    with dW [P_section, M, N] contiguous."""
    BM, BN, BK, warps, stages = config
    start, count = sched.start, sched.count
    oe, oa = out
    oa = oa if oa is not None else oe
    ae, aa, sa = operand(a, gather_a)
    be, ba, sb = operand(b, gather_b)
    P = start.numel()
    m_tiles = triton.cdiv(max(oe.shape[1], oa.shape[1]), BM)
    n_tiles = triton.cdiv(max(oe.shape[2], oa.shape[2]), BN)
    gemm_k_grouped._gemm_k_grouped_kernel[(P, m_tiles, n_tiles)](
        ae, aa, sa, be, ba, sb, plan.row_token, plan.row_weight, start, count,
        plan.num_experts,
        oe, oe.stride(0), oe.shape[1], oe.shape[2],
        oa, oa.stride(0), oa.shape[1], oa.shape[2], plan.num_expert_rows,
        BM=BM, BN=BN, BK=BK, GATHER_A=gather_a, GATHER_B=gather_b, ROW_WEIGHT_A=row_weight_a,
        ROW_WEIGHT_B=row_weight_b, **sched.numerics, num_warps=warps, num_stages=stages,
    )


def combine_rows(rows, plan, out, block_h=None):
    """out [T, H] = Σ_j rows[token_rows[t, j]] over the real slots (combine.py)."""
    T, H = out.shape
    if T == 0:
        return out
    BH = block_h or min(1024, triton.next_power_of_2(H))
    combine._combine_rows_kernel[(T, triton.cdiv(H, BH))](
        rows, rows.stride(0), plan.token_rows, plan.token_mask, out, out.stride(0), H,
        C=plan.token_rows.shape[1], BH=BH, INTERPRET=INTERPRET, num_warps=4)
    return out


# ---- the folded layout ------------------------------------------------------------------

class FoldedSchedule(NamedTuple):
    """The row blocks of a folded plan at block height block_m, and the launch shape."""
    start: torch.Tensor  # [E] int32: first row of each expert
    count: torch.Tensor  # [E] int32: rows of each expert
    block_offsets: torch.Tensor  # [E+1] int32: first row block of each expert; [E] = blocks
    bound: int  # an upper bound on the row blocks, cdiv(R, BM) + E
    block_m: int  # BM
    programs: int  # persistent launches: at most this many programs; 0: one per tile
    numerics: dict  # the numerics constexprs of the call's GEMMs (config.dot_flags)


def folded_schedule(plan, block_m, programs, numerics):
    """The FoldedSchedule of `plan` (programs: config.persistent_programs)."""
    off = plan.expert_offsets
    count = off.diff()
    blocks = (count + block_m - 1) // block_m
    block_offsets = torch.zeros(count.numel() + 1, dtype=torch.int32, device=off.device)
    torch.cumsum(blocks, 0, out=block_offsets[1:])
    bound = triton.cdiv(plan.num_rows, block_m) + plan.num_experts
    return FoldedSchedule(off[:-1].to(torch.int32), count.to(torch.int32), block_offsets, bound,
                          block_m, programs, numerics)


def grid(sched, n_grid):
    """The launch grid over (row block, N tile) items: min(programs, bound · n_grid) programs
    looping over the device's tile count, or (bound, n_grid) programs of one tile each."""
    if sched.programs:
        return (min(sched.programs, sched.bound * n_grid),)
    return (sched.bound, n_grid)


def _launch_args(plan, sched):
    """The schedule's kernel arguments and constexprs shared by every folded GEMM launch."""
    E = plan.num_experts
    return ((sched.block_offsets, sched.start, sched.count, plan.leader_ends, E,
             plan.group_size),
            dict(P_POW2=max(16, triton.next_power_of_2(E)), BM=sched.block_m,
                 PERSISTENT=sched.programs > 0, **sched.numerics))


def folded_gemm1(x, plan, sched, w1, a1, z, h=None, config=None):
    """z [R, I + Ia] (and h [R, 2I + 2Ia] when given) of every real row; adjugate columns of
    rows that lead no group are not written."""
    BN, BK, warps, stages = config
    I, Ia = w1.shape[1] // 2, a1.shape[1] // 2
    n_e, n_a = triton.cdiv(I, BN), triton.cdiv(Ia, BN)
    h_arg = h if h is not None else z
    sched_args, meta = _launch_args(plan, sched)
    gemm_folded._folded_gemm1_kernel[grid(sched, n_e)](
        x, x.stride(0), plan.row_token, *sched_args,
        w1, w1.stride(0), w1.stride(1), w1.stride(2), I,
        a1, a1.stride(0), a1.stride(1), a1.stride(2), Ia,
        z, z.stride(0), h_arg, h_arg.stride(0), x.shape[1], n_e, n_a,
        BN=BN, BK=BK, STORE_H=h is not None, **meta, num_warps=warps,
        num_stages=stages)


def folded_k_concat(plan, sched, a, k_parts, be, ba, N, out, row_weight_out, config):
    """out [R, N] = A[:, :K_E] @ B_p (· w) + lead · A[:, A_OFF:] @ B'_g (· λΣw).
    k_parts: (K_E, K_A, A_OFF); be, ba: _b views."""
    BN, BK, warps, stages = config
    n_grid = triton.cdiv(N, BN)
    sched_args, meta = _launch_args(plan, sched)
    gemm_folded._folded_k_concat_kernel[grid(sched, n_grid)](
        a, a.stride(0), *k_parts, plan.row_weight, plan.leader_weight, *sched_args, *be, *ba,
        N, n_grid, out, out.stride(0), BN=BN, BK=BK, ROW_WEIGHT_OUT=row_weight_out, **meta,
        num_warps=warps, num_stages=stages)


def folded_dgemm2(dy, plan, sched, w2, a2, h, dh, config):
    """dh [R, 2I + 2Ia] (adjugate columns on lead rows only) and (d row weight [R],
    d leader weight [R]) from the per-tile partials (summed in tile order)."""
    BN, BK, warps, stages = config
    I, Ia = w2.shape[2], a2.shape[2]
    n_e, n_a = triton.cdiv(I, BN), triton.cdiv(Ia, BN)
    R = plan.num_rows
    # Zeroed: rows past the last expert and rows that lead no group write no partial.
    part_e = torch.zeros(n_e, R, dtype=torch.float32, device=dy.device)
    part_a = torch.zeros(n_a, R, dtype=torch.float32, device=dy.device)
    sched_args, meta = _launch_args(plan, sched)
    gemm_folded._folded_dgemm2_kernel[grid(sched, n_e)](
        dy, dy.stride(0), plan.row_token, plan.row_weight, plan.leader_weight, *sched_args,
        *_b(w2, False), I, *_b(a2, False), Ia,
        h, h.stride(0), dh, part_e, part_a, R, dy.shape[1], n_e, n_a,
        BN=BN, BK=BK, **meta, num_warps=warps, num_stages=stages)
    return part_e.sum(0), part_a.sum(0)


def folded_wgrad(plan, sched, a, a_col, b, b_col, out, *, gather_a, gather_b, row_weight_a,
                 config):
    """out = (dW [E, M_E, N_E], dA [G, M_A, N_A]), both contiguous. a, b: [T, D] gathered by
    token or [R, D] row buffers; a_col / b_col: the adjugate part's first column."""
    BM, BN, BK, warps, stages = config
    oe, oa = out
    E, G = plan.num_experts, plan.num_groups
    mt_e, nt_e = triton.cdiv(oe.shape[1], BM), triton.cdiv(oe.shape[2], BN)
    mt_a, nt_a = triton.cdiv(oa.shape[1], BM), triton.cdiv(oa.shape[2], BN)
    wgrad_folded._folded_wgrad_kernel[(E * mt_e * nt_e + G * mt_a * nt_a,)](
        a, a.stride(0), a_col, b, b.stride(0), b_col,
        plan.row_token, plan.row_weight, plan.leader_weight, plan.expert_offsets,
        plan.leader_ends, E, plan.group_size,
        oe, oe.shape[1], oe.shape[2], mt_e, nt_e, oa, oa.shape[1], oa.shape[2], mt_a, nt_a,
        BM=BM, BN=BN, BK=BK, GATHER_A=gather_a, GATHER_B=gather_b, ROW_WEIGHT_A=row_weight_a,
        **sched.numerics, num_warps=warps, num_stages=stages)


def _refuse_weight_on_input(weight_on_input):
    if weight_on_input:
        raise ValueError("weight_on_input: the folded layout carries adjugates, whose API "
                         "applies the router weight to the output")


def _folded_setup(plan, x, weights):
    """(Config, GEMM-2 tile, dGEMM-2 tile, FoldedSchedule): every config.py call of a folded
    pass, made together."""
    I, Ia = weights.intermediate
    conf = cfg.select(plan, x.shape[1], I, Ia, x.dtype)
    programs, numerics = cfg.programs_for(x.device), cfg.dot_flags(x.dtype)
    rows2, rows_bwd = cfg.folded_gemm2_rows(conf), cfg.folded_dgemm2_rows(conf)
    return conf, rows2, rows_bwd, folded_schedule(plan, conf.block_m, programs, numerics)


def _folded_forward(x, weights, plan, weight_on_input, y, act):
    _refuse_weight_on_input(weight_on_input)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    conf, rows2, _, sched = _folded_setup(plan, x, weights)
    R = plan.num_rows
    if act is not None:
        h, z = act.h[0], act.z[0]
    else:
        h, z = None, x.new_empty(R, I + Ia)
    folded_gemm1(x, plan, sched, w1, a1, z, h, config=conf.gemm1)
    o = x.new_empty(R, H)
    folded_k_concat(plan, sched, z, (I, Ia, I), _b(w2, True), _b(a2, True), H, o, True, rows2)
    combine_rows(o, plan, y)


def _folded_backward(dy, x, weights, plan, weight_on_input, act, grads):
    """Writes grads; returns (d row weight [R], d leader weight [R])."""
    _refuse_weight_on_input(weight_on_input)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    dx, dw1, dw2, da1, da2 = grads
    conf, _, rows_bwd, sched = _folded_setup(plan, x, weights)
    h, z = act.h[0], act.z[0]
    # Adjugate columns of rows that lead no group stay unwritten: no later launch reads them.
    dh = torch.empty_like(h)
    d_row_weight, d_leader_weight = folded_dgemm2(dy, plan, sched, w2, a2, h, dh, rows_bwd)
    folded_wgrad(plan, sched, dy, 0, z, I, (dw2, da2), gather_a=True, gather_b=False,
                 row_weight_a=True, config=conf.wgrad)
    folded_wgrad(plan, sched, dh, 2 * I, x, 0, (dw1, da1), gather_a=False, gather_b=True,
                 row_weight_a=False, config=conf.wgrad)
    dx_rows = x.new_empty(plan.num_rows, H)
    folded_k_concat(plan, sched, dh, (2 * I, 2 * Ia, 2 * I), _b(w1, False), _b(a1, False), H,
                    dx_rows, False, conf.rows)
    combine_rows(dx_rows, plan, dx)
    return d_row_weight, d_leader_weight
