"""The `cuda` backend's experts stage on the folded adjugate layout (FoldedPlan,
grove_kernels/plan_folded.py): expert rows only, R = T*k, sorted by expert with each expert's
leader rows first; a leader row also carries its group's adjugate. No second gather of x, no
adjugate output rows, k rows per token in the combine. Launches and what each reads / writes
(W = 2I + 2Ia, Z = I + Ia; P: problems of a grouped GEMM, empty ones schedule no tile):

Forward
    gather     x [T, H] -> xg [R, H] (the real rows [0, off[E]))                  1 launch
    GEMM-1     m-grouped nt, P = 2E, one launch, both sections read the same xg rows:
                 experts    rows [off[e], off[e+1]) @ w1[e]^T       -> h[:, :2I]
                 adjugates  rows [off[e], leader_ends[e]) @ a1[e // S]^T -> h[:, 2I:]
               h [R, W] (ldc = W; the training forward's saved h). When settings.fused_gemm1
               says so (inference forwards only): nt_swiglu on w1 / a1 in place, the row
               scales (w; λΣw on the adjugate part) in its epilogue -> zs [R, Z] directly,
               and no SwiGLU launch.
    SwiGLU     swiglu_folded_fwd, one block per row over both parts (full warps):
               h -> zs [R, Z] = [w·z_e | λΣw·z_a] (+ z unscaled, training).         1 launch
               xg is freed here (the allocator reuses it for o).
    GEMM-2     m-grouped nt, P = 2E, one launch, both sections read the packed
               D = [W2_e | A2_g] [E, H, Z] (packed.pack_down), never w2 itself:
                 leader rows [off[e], leader_ends[e])  zs [., Z] @ D_e^T          (K = Z)
                 other rows  [leader_ends[e], off[e+1]) zs[:, :I] @ D_e[:, :I]^T  (K = I,
                             ldb = Z: the first I columns of the same rows)
               -> o [R, H]. W2_e is read once per call, A2_g once per expert of g that has
               leader rows. D is an E·H·Z copy (470 MB bf16 at grove-33b) kept while w2 and
               a2 keep their versions, in training as in inference: a training loop repacks
               once per optimizer step (read w2, a2, write D: ~1 GB of traffic at grove-33b),
               not per forward; writes torch does not version are not seen (packed.py).
               A training forward captured in a CUDA graph neither packs (a pack recorded in
               the graph would run on every replay: read w2 and a2, write D, ~1 GB at
               grove-33b) nor reads a pinned copy (stale after the optimizer's next update):
               P = 2E over w2 and a2 as stored, all rows zs[:, :I] @ W2_e^T -> o[:R], leader
               rows zs[:, I:] @ A2_g^T -> o[R:] (o [2R, H]; +R_lead·H written and read,
               the same cost as dGEMM-1's adjugate rows below, no dependence on the weights)
    combine    y_t = Σ_j o[token_rows[t, j]] (k rows, weights already in zs)      1 launch
               (captured training: + Σ_{j leader} o[R + token_rows[t, j]])
Rounding: a captured training forward rounds a leader row's expert and adjugate GEMM-2 terms
to bf16 / fp16 separately and adds them in fp32 in the combine, where an eager one accumulates
both in one fp32 GEMM: the two agree to the output rounding, not bit for bit.
The row weights are applied to z before GEMM-2, in fp32 on the unrounded SwiGLU
output, and w·z is rounded once to bf16 / fp16 (the sections layout rounds z, then applies w in
fp32 in the combine). Either way one rounding of each z element precedes GEMM-2 (relative
<= 2^-8 in bf16, 2^-11 in fp16) and o is rounded once; the difference is that here o rows hold
w-scaled values, so the combine's fp32 sum of k rows is unweighted. Against float64 the folded
and sections results share the tolerances (tests/test_cuda_folded.py: 2e-2 in bf16 / fp16).

Backward (h, z [unscaled] saved; no GEMM-1 recompute)
    gather     xg [R, H] from x, dyg [R, H] from dY: the two halves of one [2R, H]
               buffer, which dGEMM-1 reuses as dxr once both are dead            2 launches
    dGEMM-2    m-grouped nn, P = 2E: dyg @ w2[e] -> g[:, :I] (all rows);
               dyg @ a2[e // S] -> g[:, I:] (leader rows)                         1 launch
    SwiGLU'    swiglu_folded_bwd: dh [R, W] (adjugate part 0 off the leader rows), d row
               weight [R], d leader weight [R]                                     1 launch
    scale      scale_folded z -> zs = [w·z_e | λΣw·z_a] (z stays as saved)         1 launch
    dW2 / dA2  k-grouped tn, P = E + G: dW2_e over the rows of e, dA2_g over the rows
               [off[gS], off[gS + S]) of its S experts: the non-leader rows there hold zeros
               in zs / dh (exact zero terms), so one contiguous K range per group sums the S
               leader prefixes in a fixed order, no atomics, no partial buffers. Cost: the
               group's non-leader rows as extra K (under uniform routing ~3% of its rows,
               under coactive routing ~half: +2·(R - R_lead)·H·Ia FLOPs each for dA1, dA2,
               at most ~6% of the backward at grove-33b).                          1 launch
    dW1 / dA1  k-grouped tn, P = E + G: dh[:, :2I] / dh[:, 2I:] against xg, same ranges 1 launch
    dGEMM-1    m-grouped nn, P = 2E: dh[:, :2I] @ w1[e] -> dxr[:R] (all rows),
               dh[:, 2I:] @ a1[e // S] -> dxr[R:] (leader rows): the adjugate term gets rows
               of its own rather than a packed [W1_e ; A1_g] copy (E·W·H, 0.94 GB bf16):
               +R_lead·H written and read (1.0 GB at T = 16384, 65 MB at T = 1024). dxr
               is [2R, H], not [R, H]: a leader row's dx is dh_e @ W1_e + dh_a @ A1_g, and
               one GEMM problem can add both only with K running over [W1_e ; A1_g] (that
               packed copy), or a second launch accumulating into the first one's rows
               (an epilogue reading C = D, which no kernel of the table has: ElementC =
               void). It occupies the storage of xg and dyg, so it allocates nothing. 1 launch
    combine    dx_t = Σ_j dxr[token_rows[t, j]] + Σ_{j leader} dxr[R + token_rows[t, j]]
Returns (d row weight, d leader weight); the plan turns them into d topk_weights.
"""
import torch

from ..settings import fused_gemm1
from . import ext as lib
from . import packed as copies
from .packed import pack_down, packed_down

class _Folded:
    """Sizes, problem lists and kernels of one call on a FoldedPlan."""

    def __init__(self, x, weights, plan):
        if not weights.grove:
            raise ValueError("a1: the folded layout is for calls with adjugates")
        self.plan = plan
        self.R = plan.num_rows
        self.E, self.G = plan.num_experts, plan.num_groups
        self.S = self.E // self.G
        self.I, self.Ia = weights.intermediate
        self.dtype = x.dtype
        # The row kernels take fp32 weights; the plan's follow topk_weights (fp64 possible).
        self.row_weight = plan.row_weight.float()
        self.leader_weight = plan.leader_weight.float()
        off, ends = plan.expert_offsets, plan.leader_ends
        self.off, self.ends, self.end = off, ends, off[self.E:]
        first, last = off[:-1], off[1:]
        # (start, count) per problem, absolute rows; the second section's rows count from R.
        self.all_rows = (first, last - first)
        self.leaders = (first, ends - first)
        self.others = (ends, last - ends)
        group_first, group_last = off[:-1:self.S], off[self.S::self.S]
        self.groups = (group_first, group_last - group_first)
        self.schedule = lib.m_grouped_schedule(plan)

    def problems(self, first, second):
        """start, count of two sections' problems (the second's rows numbered from R)."""
        return (torch.cat([first[0], second[0] + self.R]),
                torch.cat([first[1], second[1]]))

    def gemm(self, a, b, out, rows, grouped, majors, epilogue=None, b_shared=(1, 1),
             row_scale=None):
        schedule = "coop" if grouped == "k" else self.schedule
        kernel = lib.gemm_kernel(self.dtype, grouped, majors, epilogue=epilogue,
                                 schedule=schedule)
        start, count = self.problems(*rows)
        lib.grouped_gemm(a, b, out, start, count, kernel, b_shared=list(b_shared),
                         row_scale=row_scale)

    def folded_rows(self):
        return self.I, self.off, self.ends


def _gather(c, src, out=None):
    out = src.new_empty(c.R, src.shape[1]) if out is None else out
    return lib.gather_rows(src, c.plan.row_token, None, c.R, c.end, None, out)


def _combine_two(c, o, y):
    """y_t = Σ_j o[token_rows[t, j]] + Σ_{j leader} o[R + token_rows[t, j]] (o [2R, H]: the
    expert term of every row, then the adjugate term of the leader rows)."""
    plan = c.plan
    token_rows = torch.cat([plan.token_rows, plan.token_rows + c.R], 1)
    token_mask = torch.cat([plan.token_mask, plan.token_leader], 1)
    lib.combine_rows(o, token_rows, token_mask, None, y)


def _gemm1(c, xg, w1, a1, act):
    """zs [R, Z] for GEMM-2; a training forward (act) also writes h and z (unscaled)."""
    I, Ia, R = c.I, c.Ia, c.R
    zs = xg.new_empty(R, I + Ia)
    if fused_gemm1(train=act is not None):
        # SwiGLU and the row scales in GEMM-1's epilogue: zs directly. The adjugate columns of
        # non-leader rows stay unwritten; GEMM-2 reads only the first I columns of those rows.
        c.gemm([xg, xg], [w1, a1], [zs[:, :I], zs[:, I:]], (c.all_rows, c.leaders),
               "m", "nt", epilogue="swiglu", b_shared=(1, c.S),
               row_scale=[c.row_weight, c.leader_weight])
        return zs
    h = act.h[0] if act is not None else xg.new_empty(R, 2 * (I + Ia))
    c.gemm([xg, xg], [w1, a1], [h[:, :2 * I], h[:, 2 * I:]], (c.all_rows, c.leaders), "m", "nt",
           b_shared=(1, c.S))
    lib.swiglu_folded_fwd(h, *c.folded_rows(), c.row_weight, c.leader_weight,
                          act.z[0] if act is not None else None, zs)
    return zs


def forward(x, weights, plan, weight_on_input, y, act):
    if weight_on_input:
        raise ValueError("apply_router_weight_on_input: not defined for calls with adjugates")
    c = _Folded(x, weights, plan)
    w1, w2, a1, a2 = weights
    xg = _gather(c, x)
    zs = _gemm1(c, xg, w1, a1, act)
    del xg  # the largest buffer of the call: free before GEMM-2 allocates o
    if copies._capturing(w2) and act is not None:
        # A captured training step: replays must follow the optimizer's updates, which a pinned
        # copy would miss (no Python runs to see the versions change), and packing inside the
        # graph would repack on every replay. GEMM-2 reads w2 and a2 as stored instead, the
        # adjugate term of a leader row into a row of its own, and the combine adds it.
        o = x.new_empty(2 * c.R, x.shape[1])
        c.gemm([zs[:, :c.I], zs[:, c.I:]], [w2, a2], [o[:c.R], o[c.R:]],
               (c.all_rows, c.leaders), "m", "nt", b_shared=(1, c.S))
        _combine_two(c, o, y)
        return
    down = packed_down.get(w2, a2)
    if down is None:  # captured inference: no eager call packed the weights yet
        down = pack_down(w2, a2)
    # Every row reads the packed copy: leader rows all K = I + Ia columns, the others its first
    # I (ldb = I + Ia), so w2 itself is not read and each expert's W2_e is read once.
    o = x.new_empty(c.R, x.shape[1])
    c.gemm([zs, zs[:, :c.I]], [down, down[:, :, :c.I]], [o, o], (c.leaders, c.others), "m",
           "nt")
    lib.combine_rows(o, plan.token_rows, plan.token_mask, None, y)


def backward(dy, x, weights, plan, weight_on_input, act, grads):
    if weight_on_input:
        raise ValueError("apply_router_weight_on_input: not defined for calls with adjugates")
    c = _Folded(x, weights, plan)
    I, R = c.I, c.R
    w1, w2, a1, a2 = weights
    dx, dw1, dw2, da1, da2 = grads
    h, z = act.h[0], act.z[0]
    # xg and dyg are the halves of one [2R, H] buffer that dGEMM-1 overwrites as dxr once both
    # are dead: the dX scratch costs no allocation of its own.
    rows2 = x.new_empty(2 * R, x.shape[1])
    xg = _gather(c, x, rows2[:R])
    dyg = _gather(c, dy, rows2[R:])

    g = x.new_empty(R, I + c.Ia)
    c.gemm([dyg, dyg], [w2, a2], [g[:, :I], g[:, I:]], (c.all_rows, c.leaders), "m", "nn",
           b_shared=(1, c.S))
    dh = torch.empty_like(h)
    d_row_weight = torch.empty(R, dtype=torch.float32, device=x.device)
    d_leader_weight = torch.empty(R, dtype=torch.float32, device=x.device)
    lib.swiglu_folded_bwd(g, h, *c.folded_rows(), c.row_weight, c.leader_weight, dh,
                          d_row_weight, d_leader_weight)
    del g
    zs = lib.scale_folded(z, *c.folded_rows(), c.row_weight, c.leader_weight,
                          torch.empty_like(z))
    c.gemm([dyg, dyg], [zs[:, :I], zs[:, I:]], [dw2, da2], (c.all_rows, c.groups), "k", "tn")
    del zs, dyg
    c.gemm([dh[:, :2 * I], dh[:, 2 * I:]], [xg, xg], [dw1, da1], (c.all_rows, c.groups), "k",
           "tn")
    del xg
    dxr = rows2  # xg and dyg are dead
    c.gemm([dh[:, :2 * I], dh[:, 2 * I:]], [w1, a1], [dxr[:R], dxr[R:]],
           (c.all_rows, c.leaders), "m", "nn", b_shared=(1, c.S))
    _combine_two(c, dxr, dx)
    return d_row_weight, d_leader_weight
