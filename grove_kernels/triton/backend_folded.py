"""The `triton` backend's experts stage on the folded adjugate layout (a FoldedPlan; backend.py
hands it here). Rows are the R = T*k expert rows, each expert's leader rows first; the kernels
and their schedule are described in gemm_folded.py and wgrad_folded.py.

Forward (launches: GEMM-1, GEMM-2, combine):
    folded_gemm1       x[token] @ [w1_e ; a1_g on leader blocks] -> z [R, I + Ia]
                       (a training forward also writes h [R, 2I + 2Ia] into the activations)
    folded_k_concat    o = w·(z_e @ w2_e^T) + λΣw·(z_a @ a2_g^T on lead rows) -> o [R, H]
    combine_rows       y_t = Σ_j o[token_rows[t, j]]  (k rows)                -> y [T, H]

Backward (h and z from the activations; launches: dGEMM-2, two wgrads, dGEMM-1, combine):
    folded_dgemm2      dY[token] @ w2_e | a2_g -> dh [R, 2I + 2Ia], d row weight [R],
                       d leader weight [R]
    folded_wgrad       dW2 / dA2 = Σ (w | λΣw · dY[token])^T z;  dW1 / dA1 = Σ dh^T x[token]
                       (dA: the leader rows of the S experts of a group)
    folded_k_concat    dx rows = dh_e @ w1_e + dh_a @ a1_g (lead rows) -> [R, H]
    combine_rows       dx_t = Σ_j dx rows
"""
import torch

from . import config as cfg
from .combine import combine_rows
from .gemm_folded import _b, folded_dgemm2, folded_gemm1, folded_k_concat, folded_schedule
from .wgrad_folded import folded_wgrad


def _check(weight_on_input):
    if weight_on_input:
        raise ValueError("weight_on_input: the folded layout carries adjugates, whose API "
                         "applies the router weight to the output")


def _setup(plan, x, weights):
    I, Ia = weights.intermediate
    conf = cfg.select(plan, x.shape[1], I, Ia, x.dtype)
    return conf, folded_schedule(plan, conf.block_m, cfg.programs_for(x.device))


def forward(x, weights, plan, weight_on_input, y, act):
    _check(weight_on_input)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    conf, sched = _setup(plan, x, weights)
    R = plan.num_rows
    if act is not None:
        h, z = act.h[0], act.z[0]
    else:
        h, z = None, x.new_empty(R, I + Ia)
    folded_gemm1(x, plan, sched, w1, a1, z, h, config=conf.gemm1)
    o = x.new_empty(R, H)
    folded_k_concat(plan, sched, z, (I, Ia, I), _b(w2, True), _b(a2, True), H, o, True,
                    cfg.folded_gemm2_rows(conf))
    combine_rows(o, plan, y)


def backward(dy, x, weights, plan, weight_on_input, act, grads):
    """Writes grads; returns (d row weight [R], d leader weight [R])."""
    _check(weight_on_input)
    H = x.shape[1]
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    dx, dw1, dw2, da1, da2 = grads
    conf, sched = _setup(plan, x, weights)
    h, z = act.h[0], act.z[0]
    # Adjugate columns of rows that lead no group stay unwritten: no later launch reads them.
    dh = torch.empty_like(h)
    d_row_weight, d_leader_weight = folded_dgemm2(dy, plan, sched, w2, a2, h, dh,
                                                  cfg.folded_dgemm2_rows(conf))
    folded_wgrad(plan, dy, 0, z, I, (dw2, da2), gather_a=True, gather_b=False, scale_a=True,
                 config=conf.wgrad)
    folded_wgrad(plan, dh, 2 * I, x, 0, (dw1, da1), gather_a=False, gather_b=True,
                 scale_a=False, config=conf.wgrad)
    dx_rows = x.new_empty(plan.num_rows, H)
    folded_k_concat(plan, sched, dh, (2 * I, 2 * Ia, 2 * I), _b(w1, False), _b(a1, False), H,
                    dx_rows, False, conf.rows)
    combine_rows(dx_rows, plan, dx)
    return d_row_weight, d_leader_weight
