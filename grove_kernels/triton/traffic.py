"""The triton backend's launches of one call, as the traffic model counts them (the model and
its byte rules: grove_kernels/traffic.py). Mirrors backend.py launch for launch, with the
tiles config.for_device picks for the named GPU; needs no GPU and no interpreter.

    launches(plan, x_shape (T, H), weights_shapes (w1, w2, a1 | None, a2 | None), dtype,
             layout, pass_, device_name) -> [Launch]

Sections layout (backend.py):
    fwd      GEMM-1 + SwiGLU   grid (row-block bound, cdiv(max(I, Ia), BN)); x rows gathered
             GEMM-2            grid (bound, cdiv(H, BN)); z rows, o [R, H]
             combine           grid (T, cdiv(H, BH)); o rows -> y
    fwd+bwd  the training forward (h kept, adjugate activations zeroed first), then
             zero partials, dGEMM-2 + SwiGLU', sum partials, dW2/dA2, dW1/dA1, dGEMM-1, combine,
             d topk_weights (torch)
bound = cdiv(R_e, BM) + cdiv(R_a, BM) + P row blocks: programs past the last real block of the
plan, and n tiles past an adjugate's narrower N, are launched and exit (idle programs).
"""
import torch

from ..traffic import (INDEX_BYTES, WEIGHT_BYTES, Launch, RowBlocks, cdiv, distinct_tokens,
                       element_size, real_rows, tile_work, topk_grad_launch,
                       torch_op, zero_activations_launch)
from . import config as cfg


def _pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


class _Problems:
    """The problems of a sections plan: rows, SwiGLU width N, whether they have rows."""

    def __init__(self, plan, I, Ia):
        self.start, self.count = (t.cpu().long() for t in plan.problem_rows())
        E, G = plan.num_experts, plan.num_groups
        self.n = torch.tensor([I] * E + [Ia] * G, dtype=torch.int64)
        self.rows = real_rows(self.start, self.count)
        self.tokens = distinct_tokens(plan.row_token, self.rows)
        self.P = E + G
        self.used = self.count > 0


def _schedule_ops(P):
    # block_schedule: problem_rows (cat, diff), cdiv, zeros, cumsum, two casts.
    return torch_op("torch: block schedule (8 ops)", 10 * P * INDEX_BYTES, 10 * P * INDEX_BYTES)


def _m_grouped(name, pr, bound, H, K, N, conf_bn, conf_bk, BM, e, *, a_gather, b_elems,
               reads_extra=0, writes=0, per_row_reads=INDEX_BYTES, store_cols=None,
               part_bytes=0):
    """One m-grouped launch over the problems `pr` (K [P], N [P] per problem)."""
    blocks = RowBlocks.of(pr.start, pr.count, BM)
    n_tiles = cdiv(int(N.max()), conf_bn)
    w = tile_work(blocks, N, K, BM, conf_bn, conf_bk, n_tiles, e, e)
    programs = bound * n_tiles
    a = pr.tokens * H * e if a_gather else int((pr.count * K).sum()) * e
    b = int((N * K * pr.used).sum()) * e * b_elems
    rows = int(pr.count.sum())
    read = a + b + rows * per_row_reads + (3 * pr.P + 1) * 4 + reads_extra
    flops = 2 * int((pr.count * N * K).sum()) * b_elems
    return Launch(name, programs, programs - w.programs, read, writes + part_bytes * w.row_tiles,
                  flops, w.programs, w.a_loads + w.b_loads * b_elems
                  + w.row_tiles * per_row_reads, w.mma_flops * b_elems)


def _combine(name, plan, H, e):
    T, C = plan.token_rows.shape
    BH = min(1024, _pow2(H))
    real = int(plan.token_mask.sum())
    return Launch(name, T * cdiv(H, BH), 0, T * C + real * (INDEX_BYTES + H * e), T * H * e, 0,
                  T * cdiv(H, BH), T * cdiv(H, BH) * C + real * cdiv(H, BH) * INDEX_BYTES
                  + real * H * e, 0)


def _k_grouped(name, pr, conf, M, N, e, *, gathered_dim, a_rows_k, b_rows_k, scale):
    """A k-grouped launch: dW_p [M_p, N_p] = sum over the problem's rows; grid (P, m, n)."""
    BMw, BNw, BKw = conf[:3]
    m_t, n_t = cdiv(int(M.max()), BMw), cdiv(int(N.max()), BNw)
    programs = pr.P * m_t * n_t
    tm, tn = (M + BMw - 1) // BMw, (N + BNw - 1) // BNw
    working = int((tm * tn).sum())
    rows = int(pr.count.sum())
    # Distinct: the row operand that is gathered by token counts distinct tokens x its width.
    a = (pr.tokens * gathered_dim * e if a_rows_k is None
         else int((pr.count * a_rows_k).sum()) * e)
    b = (pr.tokens * gathered_dim * e if b_rows_k is None
         else int((pr.count * b_rows_k).sum()) * e)
    read = a + b + rows * (INDEX_BYTES + (WEIGHT_BYTES if scale else 0)) + 2 * pr.P * 8
    write = int((M * N).sum()) * e
    flops = 2 * int((pr.count * M * N).sum())
    k_issued = (pr.count + BKw - 1) // BKw * BKw
    loads = int((pr.count * (M * tn + N * tm)).sum()) * e \
        + int((pr.count * tm * tn).sum()) * (INDEX_BYTES + (WEIGHT_BYTES if scale else 0))
    mma = 2 * BMw * BNw * int((k_issued * tm * tn).sum())
    return Launch(name, programs, programs - working, read, write, flops, working, loads, mma)


def _sections(plan, x_shape, weights_shapes, dtype, pass_, device_name):
    T, H = x_shape
    w1s, w2s, a1s, _ = weights_shapes
    I = w1s[1] // 2
    Ia = a1s[1] // 2 if a1s is not None else 0
    E, G, k = plan.num_experts, plan.num_groups, plan.top_k
    e = element_size(dtype)
    conf = cfg.for_device(device_name, T, k, E, H, I, Ia, dtype)
    BM = conf.block_m
    pr = _Problems(plan, I, Ia)
    Re, Ra, R = plan.num_expert_rows, plan.num_adjugate_rows, plan.num_rows
    bound = cdiv(Re, BM) + cdiv(Ra, BM) + pr.P
    K_h = torch.full((pr.P,), H, dtype=torch.int64)
    train = pass_ == "fwd+bwd"
    out = [_schedule_ops(pr.P)]
    if train and G:
        out.append(zero_activations_launch(plan, I, Ia, e))
    z_bytes = int((pr.count * pr.n).sum()) * e
    out.append(_m_grouped("GEMM-1 + SwiGLU", pr, bound, H, K_h, pr.n, conf.gemm1[0],
                          conf.gemm1[1], BM, e, a_gather=True, b_elems=2,
                          writes=z_bytes * (3 if train else 1)))
    H_n = torch.full((pr.P,), H, dtype=torch.int64)
    o_bytes = int(pr.count.sum()) * H * e
    out.append(_m_grouped("GEMM-2", pr, bound, H, pr.n, H_n, conf.rows[0], conf.rows[1], BM, e,
                          a_gather=False, b_elems=1, writes=o_bytes,
                          per_row_reads=INDEX_BYTES + WEIGHT_BYTES))
    out.append(_combine("combine", plan, H, e))
    if not train:
        return out

    rows_bwd = cfg.swiglu_bwd_rows(conf)
    n_part = cdiv(max(I, Ia), rows_bwd[0])
    out.append(_schedule_ops(pr.P))
    out.append(torch_op("torch: zero partials", 0, n_part * R * 4, n_part * R))
    h_bytes = 2 * z_bytes
    out.append(_m_grouped("dGEMM-2 + SwiGLU'", pr, bound, H, K_h, pr.n, rows_bwd[0],
                          rows_bwd[1], BM, e, a_gather=True, b_elems=1, reads_extra=h_bytes,
                          writes=h_bytes, per_row_reads=INDEX_BYTES + WEIGHT_BYTES,
                          part_bytes=4))
    out.append(torch_op("torch: sum partials", n_part * R * 4, R * 4, n_part * R))
    out.append(_k_grouped("dW2 / dA2", pr, conf.wgrad, H_n, pr.n, e, gathered_dim=H,
                          a_rows_k=None, b_rows_k=pr.n, scale=True))
    out.append(_k_grouped("dW1 / dA1", pr, conf.wgrad, 2 * pr.n, H_n, e, gathered_dim=H,
                          a_rows_k=2 * pr.n, b_rows_k=None, scale=False))
    out.append(_m_grouped("dGEMM-1", pr, bound, H, 2 * pr.n, H_n, conf.rows[0], conf.rows[1],
                          BM, e, a_gather=False, b_elems=1, writes=o_bytes))
    out.append(_combine("combine dx", plan, H, e))
    out.append(topk_grad_launch(plan))
    return out


def _folded(plan, x_shape, weights_shapes, dtype, pass_, device_name):
    """The folded layout as the layout's contract describes its kernels (docs/design.md): one
    launch per GEMM stage whose programs are exactly the work tiles (no idle program); leader
    row blocks add the adjugate's columns (GEMM-1, dGEMM-2) or K (GEMM-2, dGEMM-1)."""
    T, H = x_shape
    I = weights_shapes[0][1] // 2
    Ia = weights_shapes[2][1] // 2
    E, S, k = plan.num_experts, plan.group_size, plan.top_k
    e = element_size(dtype)
    conf = cfg.for_device(device_name, T, k, E, H, I, Ia, dtype)
    BM = conf.block_m
    off = plan.expert_offsets.cpu().long()
    lead = plan.leader_ends.cpu().long() - off[:-1]
    count = off.diff()
    blocks = RowBlocks.of(off[:-1], count, BM)
    # Leader rows of each block: the prefix [off[e], leader_ends[e]) of its expert.
    block_lead = torch.clamp(off[blocks.problem] + lead[blocks.problem] - blocks.first, 0)
    block_lead = torch.minimum(block_lead, blocks.rows)
    lblocks = RowBlocks(blocks.problem[block_lead > 0], blocks.first[block_lead > 0],
                        block_lead[block_lead > 0])
    rows_all = real_rows(off[:-1], count)
    tokens = distinct_tokens(plan.row_token, rows_all)
    R, L = int(count.sum()), int(lead.sum())
    groups_used = int(torch.unique(torch.arange(E)[lead > 0] // S).numel())
    experts_used = int((count > 0).sum())
    full = lambda n: torch.full((E,), n, dtype=torch.int64)  # noqa: E731
    train = pass_ == "fwd+bwd"

    def m_launch(name, cfg_nk, K_e, N_e, K_a, N_a, b_elems, read, write, flops, per_row):
        """Leader blocks add N_a columns (N_a != N_e) or K_a to the K of their N_e tiles."""
        bn, bk = cfg_nk
        we = tile_work(blocks, full(N_e), full(K_e), BM, bn, bk, cdiv(N_e, bn), e, e)
        wa = tile_work(lblocks, full(N_a), full(K_a), BM, bn, bk, cdiv(N_a, bn), e, e)
        tiles = we.programs + (wa.programs if N_a != N_e else 0)
        loads = (we.a_loads + wa.a_loads + (we.b_loads + wa.b_loads) * b_elems
                 + we.row_tiles * per_row)
        return Launch(name, tiles, 0, read + R * per_row, write, flops, tiles, loads,
                      (we.mma_flops + wa.mma_flops) * b_elems)

    out = [_schedule_ops(E)]
    if train:
        out.append(zero_activations_launch(plan, I, Ia, e))
    z = (R * I + L * Ia) * e
    w1 = (experts_used * 2 * I + groups_used * 2 * Ia) * H * e
    w2 = (experts_used * I + groups_used * Ia) * H * e
    out.append(m_launch("GEMM-1 + SwiGLU (folded)", conf.gemm1[:2], H, I, H, Ia, 2,
                        tokens * H * e + w1, z * (3 if train else 1),
                        2 * (R * 2 * I + L * 2 * Ia) * H, INDEX_BYTES))
    # GEMM-2: N = H on every block; K = I, and I + Ia on leader blocks.
    out.append(m_launch("GEMM-2 (folded)", conf.rows[:2], I, H, Ia, H, 1,
                        z + w2 + L * WEIGHT_BYTES, R * H * e, 2 * (R * I + L * Ia) * H,
                        INDEX_BYTES + WEIGHT_BYTES))
    out.append(_combine("combine", plan, H, e))
    if not train:
        return out
    rows_bwd = cfg.swiglu_bwd_rows(conf)
    out.append(_schedule_ops(E))
    h = 2 * z
    out.append(m_launch("dGEMM-2 + SwiGLU' (folded)", rows_bwd[:2], H, I, H, Ia, 1,
                        tokens * H * e + w2 + h + L * WEIGHT_BYTES, h + 2 * R * 4,
                        2 * (R * I + L * Ia) * H, INDEX_BYTES + WEIGHT_BYTES))
    wg = conf.wgrad
    for name, M_e, N_e, M_a, N_a, a_b, b_b in (
            ("dW2", H, I, H, Ia, tokens * H * e, z), ("dW1", 2 * I, H, 2 * Ia, H, h,
                                                      tokens * H * e)):
        for part, M, N, P, rows in ((name, M_e, N_e, E, R),
                                    ({"dW2": "dA2", "dW1": "dA1"}[name], M_a, N_a, E // S, L)):
            tiles = P * cdiv(M, wg[0]) * cdiv(N, wg[1])
            out.append(Launch(f"{part} (folded)", tiles, 0, a_b + b_b + rows * INDEX_BYTES,
                              P * M * N * e, 2 * rows * M * N, tiles))
    out.append(m_launch("dGEMM-1 (folded)", conf.rows[:2], 2 * I, H, 2 * Ia, H, 1,
                        h + w1, R * H * e, 2 * (R * 2 * I + L * 2 * Ia) * H, INDEX_BYTES))
    out.append(_combine("combine dx", plan, H, e))
    out.append(topk_grad_launch(plan))
    return out


def launches(plan, x_shape, weights_shapes, dtype, layout, pass_, device_name):
    """The launches of the triton backend's experts stage for one call (see the module
    docstring); the plan stage's are grove_kernels.traffic.plan_launches."""
    if layout == "folded" and weights_shapes[2] is not None:
        return _folded(plan, x_shape, weights_shapes, dtype, pass_, device_name)
    return _sections(plan, x_shape, weights_shapes, dtype, pass_, device_name)
