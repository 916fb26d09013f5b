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

Folded layout (backend.py, gemm_folded.py, wgrad_folded.py): the same three forward
launches over the R = T*k expert rows, and in the backward dGEMM-2 + SwiGLU', one flat launch
per weight-gradient pair (dW and dA), dGEMM-1. The adjugate tiles run inside the items of
leader row blocks; persistent launches (the default) idle only programs beyond the items, the
tiles schedule (GROVE_TRITON_SCHEDULE=tiles) the row blocks past the plan's last.
"""
import torch

from ..traffic import (INDEX_BYTES, WEIGHT_BYTES, Launch, RowBlocks, by_layout, cdiv,
                       distinct_tokens, element_size, real_rows, tile_work, topk_grad_launch,
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


def _k_grouped(name, pr, conf, M, N, e, *, gathered_dim, a_rows_k, b_rows_k, row_weight):
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
    read = a + b + rows * (INDEX_BYTES + (WEIGHT_BYTES if row_weight else 0)) + 2 * pr.P * 8
    write = int((M * N).sum()) * e
    flops = 2 * int((pr.count * M * N).sum())
    k_issued = (pr.count + BKw - 1) // BKw * BKw
    loads = int((pr.count * (M * tn + N * tm)).sum()) * e \
        + int((pr.count * tm * tn).sum()) * (INDEX_BYTES + (WEIGHT_BYTES if row_weight else 0))
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
                          a_rows_k=None, b_rows_k=pr.n, row_weight=True))
    out.append(_k_grouped("dW1 / dA1", pr, conf.wgrad, 2 * pr.n, H_n, e, gathered_dim=H,
                          a_rows_k=2 * pr.n, b_rows_k=None, row_weight=False))
    out.append(_m_grouped("dGEMM-1", pr, bound, H, 2 * pr.n, H_n, conf.rows[0], conf.rows[1],
                          BM, e, a_gather=False, b_elems=1, writes=o_bytes))
    out.append(_combine("combine dx", plan, H, e))
    out.append(topk_grad_launch(plan))
    return out


def _folded(plan, x_shape, weights_shapes, dtype, pass_, device_name):
    """The folded layout (backend.py, gemm_folded.py, wgrad_folded.py): items (row block
    of the expert rows, expert N tile); on a leader block (first row below leader_ends) item n
    also runs adjugate tiles n, n + n_e, ... over the block's leader rows (GEMM-1, dGEMM-2),
    or adds the K = Ia product of its leader rows (GEMM-2, dGEMM-1). Persistent schedule
    (config.persistent_programs, GROVE_TRITON_SCHEDULE): min(SMs · PROGRAMS_PER_SM,
    bound · n_tiles) programs loop over the real items, idle only where there are fewer items
    than programs; tiles schedule: grid (bound cdiv(R, BM) + E, n_tiles), programs past the
    last real block idle. The weight gradients are one flat launch of every output tile of
    dW_e and dA_g (no idle program)."""
    T, H = x_shape
    I = weights_shapes[0][1] // 2
    Ia = weights_shapes[2][1] // 2
    E, S, k = plan.num_experts, plan.group_size, plan.top_k
    G = E // S
    e = element_size(dtype)
    conf = cfg.for_device(device_name, T, k, E, H, I, Ia, dtype)
    BM = conf.block_m
    off = plan.expert_offsets.cpu().long()
    first, count = off[:-1], off.diff()
    lead = plan.leader_ends.cpu().long() - first
    blocks = RowBlocks.of(first, count, BM)
    # A leader block starts below its expert's leader end; its leader rows are a prefix.
    lead_rows = torch.minimum(torch.clamp(first[blocks.problem] + lead[blocks.problem]
                                          - blocks.first, min=0), blocks.rows)
    is_lead = lead_rows > 0
    lblocks = RowBlocks(blocks.problem[is_lead], blocks.first[is_lead], lead_rows[is_lead])
    tokens = distinct_tokens(plan.row_token, real_rows(first, count))
    R, L = int(count.sum()), int(lead.sum())
    bound = cdiv(plan.num_rows, BM) + E
    experts_used = int((count > 0).sum())
    groups_lead = int(torch.unique(blocks.problem[is_lead] // S).numel())
    full = lambda n: torch.full((E,), n, dtype=torch.int64)  # noqa: E731
    sched = (2 * E + 1) * 4 + E * INDEX_BYTES  # block_offsets, start, count; leader_ends
    train = pass_ == "fwd+bwd"

    cap = cfg.persistent_programs(cfg.sms_of(device_name))

    def grid_launch(name, bn, bk, n_grid, parts, read, write, flops, per_row, part_bytes=0):
        """parts: (blocks, N, K, b operands). Persistent: min(cap, bound · n_grid) programs
        share the real (row block, N tile) items; else one program per item of the bound."""
        items = len(blocks) * n_grid
        programs = min(cap, bound * n_grid) if cap else bound * n_grid
        working = min(programs, items)
        loads = mma = row_tiles = 0
        for blk, N, K, b_elems in parts:
            w = tile_work(blk, full(N), full(K), BM, bn, bk, cdiv(N, bn), e, e)
            loads += w.a_loads + w.b_loads * b_elems
            mma += w.mma_flops * b_elems
            row_tiles += w.row_tiles
        loads += row_tiles * per_row
        return Launch(name, programs, programs - working, read, write + part_bytes, flops,
                      working, loads, mma)

    n_e = cdiv(I, conf.gemm1[0])
    z = (R * I + L * Ia) * e
    w1 = experts_used * 2 * I * H * e + groups_lead * 2 * Ia * H * e
    w2 = experts_used * H * I * e + groups_lead * H * Ia * e
    out = [torch_op("torch: folded schedule (6 ops)", 6 * E * INDEX_BYTES, 6 * E * INDEX_BYTES)]
    if train:
        out.append(zero_activations_launch(plan, I, Ia, e))
    out.append(grid_launch(
        "GEMM-1 + SwiGLU (folded)", conf.gemm1[0], conf.gemm1[1], n_e,
        [(blocks, I, H, 2), (lblocks, Ia, H, 2)],
        tokens * H * e + w1 + R * INDEX_BYTES + sched, z * (3 if train else 1),
        2 * (R * 2 * I + L * 2 * Ia) * H, INDEX_BYTES))
    # The folded GEMM-2 / dGEMM-2 configs where config.py defines their own (else those of
    # the sections layout's launches, which backend.py then uses).
    rows2 = getattr(cfg, "folded_gemm2_rows", lambda c: c.rows)(conf)
    n_h2 = cdiv(H, rows2[0])
    out.append(grid_launch(
        "GEMM-2 (folded)", rows2[0], rows2[1], n_h2, [(blocks, H, I, 1),
                                                             (lblocks, H, Ia, 1)],
        z + w2 + R * WEIGHT_BYTES + L * WEIGHT_BYTES + sched, R * H * e,
        2 * (R * I + L * Ia) * H, 0))
    out.append(_combine("combine", plan, H, e))
    if not train:
        return out

    bn_b, bk_b = getattr(cfg, "folded_dgemm2_rows", cfg.swiglu_bwd_rows)(conf)[:2]
    n_eb, n_ab = cdiv(I, bn_b), cdiv(Ia, bn_b)
    R_alloc = plan.num_rows
    h = 2 * z
    out.append(torch_op("torch: folded schedule (6 ops)", 6 * E * INDEX_BYTES,
                        6 * E * INDEX_BYTES))
    out.append(torch_op("torch: zero partials (2 ops)", 0, (n_eb + n_ab) * R_alloc * 4,
                        (n_eb + n_ab) * R_alloc))
    out.append(grid_launch(
        "dGEMM-2 + SwiGLU' (folded)", bn_b, bk_b, n_eb, [(blocks, I, H, 1), (lblocks, Ia, H, 1)],
        tokens * H * e + w2 + h + R * (INDEX_BYTES + WEIGHT_BYTES) + L * WEIGHT_BYTES + sched,
        h, 2 * (R * I + L * Ia) * H, INDEX_BYTES, part_bytes=(R * n_eb + L * n_ab) * 4))
    out.append(torch_op("torch: sum partials (2 ops)", (n_eb + n_ab) * R_alloc * 4,
                        2 * R_alloc * 4, (n_eb + n_ab) * R_alloc))
    BMw, BNw, BKw = conf.wgrad[:3]
    count_g = lead.view(G, S).sum(1)
    for name, M_e, N_e, M_a, N_a, read in (
            ("dW2 / dA2 (folded)", H, I, H, Ia,
             tokens * H * e + z + R * (INDEX_BYTES + WEIGHT_BYTES) + L * WEIGHT_BYTES),
            ("dW1 / dA1 (folded)", 2 * I, H, 2 * Ia, H,
             h + tokens * H * e + R * INDEX_BYTES)):
        mt_e, nt_e, mt_a, nt_a = (cdiv(M_e, BMw), cdiv(N_e, BNw), cdiv(M_a, BMw),
                                  cdiv(N_a, BNw))
        programs = E * mt_e * nt_e + G * mt_a * nt_a
        loads = (int(count.sum()) * (M_e * nt_e + N_e * mt_e)
                 + int(count_g.sum()) * (M_a * nt_a + N_a * mt_a)) * e
        k_e = (count + BKw - 1) // BKw * BKw
        k_a = sum(((lead.view(G, S) + BKw - 1) // BKw * BKw).sum(1).tolist())
        mma = 2 * BMw * BNw * (int(k_e.sum()) * mt_e * nt_e + k_a * mt_a * nt_a)
        out.append(Launch(name, programs, 0, read, (E * M_e * N_e + G * M_a * N_a) * e,
                          2 * (R * M_e * N_e + L * M_a * N_a), programs, loads, mma))
    n_h = cdiv(H, conf.rows[0])
    out.append(grid_launch(
        "dGEMM-1 (folded)", conf.rows[0], conf.rows[1], n_h, [(blocks, H, 2 * I, 1),
                                                              (lblocks, H, 2 * Ia, 1)],
        h + w1 + sched, R * H * e, 2 * (R * 2 * I + L * 2 * Ia) * H, 0))
    out.append(_combine("combine dx", plan, H, e))
    out.append(topk_grad_launch(plan))
    return out


# The launches of the triton backend's experts stage for one call (see the module docstring);
# the plan stage's are grove_kernels.traffic.plan_launches.
launches = by_layout(_folded, _sections)
