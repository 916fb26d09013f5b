"""The `triton` backend's ops: routing, forward and backward of the Grove / plain MoE layer.

Forward (launches: plan, GEMM-1, GEMM-2, combine):
    plan(topk_ids, topk_weights)                        rows of E + G problems
    GEMM-1 + SwiGLU   x[token] @ w1|a1 -> z_e [R_e, I], z_a [R_a, Ia]
    GEMM-2            z @ w2|a2 · row weight -> o [R, H]
    combine           y_t = Σ_j o[token_rows[t, j]]          -> y [T, H]

Training forward (ops.experts_forward_train, `saved` given): GEMM-1 also stores h = (hg, hu)
[R, 2N], and z and h are written into `saved` ([R_e, I], [R_a, Ia], [R_e, 2I], [R_a, 2Ia]).

Backward (z and h from `saved`, or GEMM-1 recomputed when called without it: by FLOPs,
recomputing makes forward + backward 3.67x the forward instead of 3x):
    GEMM-1 again      -> z, h              (only without `saved`)
    dGEMM-2 + SwiGLU' dY[token] @ w2|a2 -> dh [R, 2N], d row weight partials
    dW2 / dA2         Σ_rows (w·dY[token])^T z
    dW1 / dA1         Σ_rows dh^T x[token]
    dGEMM-1           dh @ w1|a1 -> dx rows [R, H];  combine -> dx [T, H]
    d topk_weights    expert rows: d w;  adjugate rows: λ·d w to each slot of the group
"""
import torch

from . import config as cfg
from . import is_available, runs_on_cpu  # noqa: F401  (the backend registry reads them)
from ._common import INTERPRET, block_schedule
from .combine import combine_rows
from .gemm_fwd import gemm1_swiglu
from .gemm_rows import DOT_X, STORE, SWIGLU_BWD, grouped_rows
from .gemm_wgrad import grouped_wgrad
from .plan import build_plan
from .routing import topk as _topk

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(x):
    if x.dtype not in _DTYPES:
        raise TypeError(f"hidden_states: the triton backend supports {list(_DTYPES)}, got "
                        f"{x.dtype}; use the torch backend for float64")


def topk(router_logits, top_k, renormalize, selection_bias):
    return _topk(router_logits, top_k, renormalize, selection_bias)


def _setup(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size, adjugate_scale):
    _check_dtype(x)
    for name, w in (("w1", w1), ("w2", w2), ("a1", a1), ("a2", a2)):
        # The kernels bake the unit stride of the weights' last dimension into their loads.
        if w is not None and not w.is_contiguous():
            raise ValueError(f"{name}: the triton backend needs contiguous weights, got strides "
                             f"{w.stride()}")
    plan = build_plan(topk_ids, topk_weights, w1.shape[0], group_size if a1 is not None else 0,
                      adjugate_scale, expert_map)
    I = w1.shape[1] // 2
    Ia = a1.shape[1] // 2 if a1 is not None else 0
    conf = cfg.select(plan, x.shape[1], I, Ia, x.dtype)
    return plan, conf, I, Ia


def saved_numel(T, k, E, G, I, Ia):
    """Elements of a training forward's `saved`: z and h = (hg, hu) of every plan row
    (R_e = T·k rows of 3I, R_a = T·min(k, G) rows of 3Ia; the plan's fixed upper bounds)."""
    return T * k * 3 * I + (T * min(k, G) * 3 * Ia if G else 0)


def _saved_views(saved, plan, I, Ia, grove):
    """(ze, za), (he, ha): views of `saved` in saved_numel's order."""
    Re, Ra = plan.num_expert_rows, plan.num_adjugate_rows
    shapes = [(Re, I), (Ra, Ia), (Re, 2 * I), (Ra, 2 * Ia)]
    views, offset = [], 0
    for rows, cols in shapes:
        views.append(saved[offset:offset + rows * cols].view(rows, cols) if cols else None)
        offset += rows * cols
    ze, za, he, ha = views
    return (ze, za if grove else None), (he, ha if grove else None)


def _gemm1(x, plan, conf, w1, a1, I, Ia, weight_on_input, store_h, saved=None, skips=False):
    sched = block_schedule(plan, conf.block_m)
    Re, Ra = plan.num_expert_rows, plan.num_adjugate_rows
    if saved is not None:
        (ze, za), (he, ha) = _saved_views(saved, plan, I, Ia, a1 is not None)
        # GEMM-1 never writes rows of no problem (the adjugate section's tail; expert rows of
        # slots an expert_map skips): zero them, an op output must not hold allocator leftovers.
        for t in ((ze, he) if skips else ()) + (za, ha):
            if t is not None:
                t.zero_()
    else:
        ze = x.new_empty(Re, I)
        za = x.new_empty(Ra, Ia) if a1 is not None else None
        he = x.new_empty(Re, 2 * I) if store_h else None
        ha = x.new_empty(Ra, 2 * Ia) if store_h and a1 is not None else None
    gemm1_swiglu(x, plan, sched + (conf.block_m,), w1, a1, ze, za, he, ha,
                 scale_input=weight_on_input, config=conf.gemm1, upcast=INTERPRET)
    return sched + (conf.block_m,), (ze, za), (he, ha)


def _b(w, transpose):
    """Per-problem B_p [K, N] of a weight [P, N, K] (transpose) or [P, K, N], as strides."""
    if w is None:
        return None
    s_p, s_0, s_1 = w.stride()
    return (w, s_p, s_1, s_0) if transpose else (w, s_p, s_0, s_1)


def experts_forward(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
                    adjugate_scale, weight_on_input, saved=None):
    T, H = x.shape
    plan, conf, I, Ia = _setup(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map,
                               group_size, adjugate_scale)
    y = x.new_empty(T, H)
    x = x.contiguous()
    sched, z, _ = _gemm1(x, plan, conf, w1, a1, I, Ia, weight_on_input,
                         store_h=saved is not None, saved=saved, skips=expert_map is not None)
    o = x.new_empty(plan.num_rows, H)
    b_e = _b(w2, True)
    grouped_rows(plan, sched, z, (b_e, _b(a2, True) or b_e), (H, H), o,
                 row_scale=not weight_on_input, config=conf.rows, upcast=INTERPRET)
    return combine_rows(o, plan, y)


def experts_backward(grad_out, x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map,
                     group_size, adjugate_scale, weight_on_input, saved=None):
    H = x.shape[1]
    plan, conf, I, Ia = _setup(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map,
                               group_size, adjugate_scale)
    x = x.contiguous()
    dy = grad_out.to(x.dtype).contiguous()
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    da1 = torch.empty_like(a1) if a1 is not None else None
    da2 = torch.empty_like(a2) if a2 is not None else None

    if saved is not None:
        sched = block_schedule(plan, conf.block_m) + (conf.block_m,)
        z, h = _saved_views(saved, plan, I, Ia, a1 is not None)
    else:
        sched, z, h = _gemm1(x, plan, conf, w1, a1, I, Ia, weight_on_input, store_h=True)
    start, count = sched[0], sched[1]
    R = plan.num_rows
    dh = (torch.empty_like(h[0]), torch.empty_like(h[1]) if h[1] is not None else None)
    # Zeroed: tiles past an adjugate's narrower N write no partial, and are summed too.
    rows_bwd = cfg.swiglu_bwd_rows(conf)
    part = torch.zeros(cfg.tiles(max(I, Ia), rows_bwd[0]), R, dtype=torch.float32,
                       device=x.device)
    b2e = _b(w2, False)
    n = grouped_rows(plan, sched, dy, (b2e, _b(a2, False) or b2e), (I, Ia or I), dh,
                     a_gather=True, row_scale=not weight_on_input, epilogue=SWIGLU_BWD, h=h,
                     part=part, config=rows_bwd, upcast=INTERPRET)
    d_row_weight = part[:n].sum(0)

    grouped_wgrad(plan, start, count, dy, z, (dw2, da2), gather_a=True,
                  scale_a=not weight_on_input, config=conf.wgrad, upcast=INTERPRET)
    grouped_wgrad(plan, start, count, dh, x, (dw1, da1), gather_b=True,
                  scale_b=weight_on_input, config=conf.wgrad, upcast=INTERPRET)

    dx_rows = x.new_empty(R, H)
    b1e = _b(w1, False)
    if weight_on_input:
        part_x = torch.zeros(cfg.tiles(H, conf.rows[0]), R, dtype=torch.float32,
                             device=x.device)
        n = grouped_rows(plan, sched, dh, (b1e, _b(a1, False) or b1e), (H, H), dx_rows,
                         row_scale=True, epilogue=DOT_X, x=x, part=part_x, config=conf.rows,
                         upcast=INTERPRET)
        d_row_weight = part_x[:n].sum(0)
    else:
        grouped_rows(plan, sched, dh, (b1e, _b(a1, False) or b1e), (H, H), dx_rows,
                     epilogue=STORE, config=conf.rows, upcast=INTERPRET)
    dx = combine_rows(dx_rows, plan, torch.empty_like(x))

    d_topk = plan.topk_weight_grad(d_row_weight, adjugate_scale)
    return dx, dw1, dw2, da1, da2, d_topk.to(topk_weights.dtype)
