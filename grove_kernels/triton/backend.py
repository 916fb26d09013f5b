"""The `triton` backend's experts stage: forward and backward of the Grove / plain MoE layer over
a Plan (protocol in grove_kernels/experts.py). One launch per GEMM stage covers both sections.
FoldedPlans (the folded adjugate layout) go to backend_folded.py.

Forward (launches: GEMM-1, GEMM-2, combine):
    GEMM-1 + SwiGLU   x[token] @ w1|a1 -> z_e [R_e, I], z_a [R_a, Ia]   (a training forward also
                      keeps h = (hg, hu) [R, 2N] and z in the activations)
    GEMM-2            z @ w2|a2 · row weight -> o [R, H]
    combine           y_t = Σ_j o[token_rows[t, j]]          -> y [T, H]

Backward (z and h from the activations):
    dGEMM-2 + SwiGLU' dY[token] @ w2|a2 -> dh [R, 2N], d row weight partials
    dW2 / dA2         Σ_rows (w·dY[token])^T z
    dW1 / dA1         Σ_rows dh^T x[token]
    dGEMM-1           dh @ w1|a1 -> dx rows [R, H];  combine -> dx [T, H]
"""
import torch

from . import config as cfg
from .combine import combine_rows
from .gemm1_swiglu import gemm1_swiglu
from .gemm_common import block_schedule
from .gemm_k_grouped import gemm_k_grouped
from .gemm_m_grouped import DOT_X, STORE, SWIGLU_BWD, gemm_m_grouped


def _schedule(plan, x, weights):
    if plan.num_rows >= 2 ** 31:  # row indices and the block schedule are 32-bit
        raise ValueError(f"hidden_states: the triton backend indexes plan rows in 32 bits; "
                         f"{plan.num_tokens} tokens make {plan.num_rows} rows (T·(k + "
                         f"min(k, G))), more than 2^31 - 1: split the call")
    I, Ia = weights.intermediate
    conf = cfg.select(plan, x.shape[1], I, Ia, x.dtype)
    return conf, block_schedule(plan, conf.block_m)


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
        from . import backend_folded
        return backend_folded.forward(x, weights, plan, weight_on_input, y, act)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    conf, sched = _schedule(plan, x, weights)
    if act is not None:
        (ze, za), (he, ha) = act.z, act.h
    else:
        ze, za = x.new_empty(plan.num_expert_rows, I), None
        if weights.grove:
            za = x.new_empty(plan.num_adjugate_rows, Ia)
        he = ha = None
    gemm1_swiglu(x, plan, sched, w1, a1, ze, za, he, ha, weight_on_input=weight_on_input,
                 config=conf.gemm1)
    o = x.new_empty(plan.num_rows, H)
    gemm_m_grouped(plan, sched, (ze, za), _b_pair(w2, a2, True), (H, H), o,
                   row_scale=not weight_on_input, config=conf.rows)
    combine_rows(o, plan, y)


def backward(dy, x, weights, plan, weight_on_input, act, grads):
    if plan.layout == "folded":
        from . import backend_folded
        return backend_folded.backward(dy, x, weights, plan, weight_on_input, act, grads)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    dx, dw1, dw2, da1, da2 = grads
    conf, sched = _schedule(plan, x, weights)
    z, h = act.z, act.h
    R = plan.num_rows
    dh = (torch.empty_like(h[0]), torch.empty_like(h[1]) if h[1] is not None else None)
    # Zeroed: tiles past an adjugate's narrower N write no partial, and are summed too.
    rows_bwd = cfg.swiglu_bwd_rows(conf)
    part = torch.zeros(cfg.tiles(max(I, Ia), rows_bwd.bn), R, dtype=torch.float32,
                       device=x.device)
    n = gemm_m_grouped(plan, sched, dy, _b_pair(w2, a2, False), (I, Ia or I), dh,
                       gather_a=True, row_scale=not weight_on_input, epilogue=SWIGLU_BWD, h=h,
                       part=part, config=rows_bwd)
    d_row_weight = part[:n].sum(0)

    gemm_k_grouped(plan, sched.start, sched.count, dy, z, (dw2, da2), gather_a=True,
                   scale_a=not weight_on_input, config=conf.wgrad)
    gemm_k_grouped(plan, sched.start, sched.count, dh, x, (dw1, da1), gather_b=True,
                   scale_b=weight_on_input, config=conf.wgrad)

    dx_rows = x.new_empty(R, H)
    b1 = _b_pair(w1, a1, False)
    if weight_on_input:
        part_x = torch.zeros(cfg.tiles(H, conf.rows.bn), R, dtype=torch.float32,
                             device=x.device)
        n = gemm_m_grouped(plan, sched, dh, b1, (H, H), dx_rows, row_scale=True,
                           epilogue=DOT_X, x=x, part=part_x, config=conf.rows)
        d_row_weight = part_x[:n].sum(0)
    else:
        gemm_m_grouped(plan, sched, dh, b1, (H, H), dx_rows, epilogue=STORE, config=conf.rows)
    combine_rows(dx_rows, plan, dx)
    return d_row_weight
