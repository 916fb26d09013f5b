"""The `torch` backend on the folded adjugate layout (a FoldedPlan, plan_folded.py): the readable
semantics, vectorized, on any device. reference.py hands FoldedPlans here.

Rows are the R = T*k expert rows; the leader rows of expert e, [off[e], leader_ends[e]), also
carry the adjugate of g = e // S. With A1_e = a1[e // S], A2_e = a2[e // S] (views repeated S
times, so each expert problem sees its group's adjugate):

    x [T, H] --gather rows--> xr [R, H]
    GEMM-1   he = xr @ w1[e]^T [R, 2I];   ha = lead · (xr @ A1_e^T) [R, 2Ia]
    SwiGLU   ze [R, I], za [R, Ia]   (h = [he | ha], z = [ze | za] kept by a training forward)
    GEMM-2   o = w · (ze @ w2[e]^T) + λΣw · (za @ A2_e^T)   [R, H] (fp32: the two scales apply
             to the unrounded products, o is never rounded)
    combine  y_t = Σ_j o[token_rows[t, j]]   (k rows, fixed slot order)

`lead` masks the rows that lead no group: the reference computes the adjugate GEMMs on every
expert row and zeroes the others, the plainest statement of "leader rows only" (a kernel
backend spends no work there). Backward: d row weight = <dY_t, w2 part>, d leader weight =
<dY_t, A2 part>; dW2/dW1 per expert; dA2/dA1 = per-expert sums over leader rows, then summed
over the S experts of each group in expert order (deterministic); dX = Σ_j dX rows.
"""
import torch

from . import reference as ref
from .routing import acc_dtype


def _leader_rows(plan):
    """[R] bool: the row leads its token's group."""
    R = plan.num_rows
    r = torch.arange(R, device=plan.row_token.device)
    expert = torch.searchsorted(plan.expert_offsets[1:].contiguous(), r, right=True)
    real = expert < plan.num_experts
    ends = plan.leader_ends[expert.clamp(max=plan.num_experts - 1)]
    return real & (r < ends)


def _per_expert(a, S):
    """[G, ...] -> [E, ...]: each expert's view of its group's weight."""
    return a.repeat_interleave(S, dim=0)


def _group_sum(d, S):
    """[E, ...] per-expert partials -> [G, ...], experts of a group summed in order."""
    G = d.shape[0] // S
    parts = d.view(G, S, *d.shape[1:]).to(acc_dtype(d.dtype))
    total = parts[:, 0].clone()
    for s in range(1, S):
        total += parts[:, s]
    return total.to(d.dtype)


def _check(weight_on_input):
    if weight_on_input:
        raise ValueError("weight_on_input: the folded layout carries adjugates, whose API "
                         "applies the router weight to the output")


def forward(x, weights, plan, weight_on_input, y, act):
    _check(weight_on_input)
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    S, off = plan.group_size, plan.expert_offsets
    lead = _leader_rows(plan)[:, None]
    xr = x[plan.row_token]
    he = ref.gmm(xr, w1, off, True)
    ha = torch.where(lead, ref.gmm(xr, _per_expert(a1, S), off, True), 0)
    ze, za = ref.swiglu(he), ref.swiglu(ha)
    if act is not None:
        h, z = act.h[0], act.z[0]
        h[:, :2 * I].copy_(he)
        h[:, 2 * I:].copy_(ha)
        z[:, :I].copy_(ze)
        z[:, I:].copy_(za)
    acc = acc_dtype(x.dtype)
    o = (ref.gmm(ze, w2, off, True).to(acc) * plan.row_weight[:, None].to(acc)
         + ref.gmm(za, _per_expert(a2, S), off, True).to(acc)
         * plan.leader_weight[:, None].to(acc))
    y.copy_(ref._gather_sum(plan, o, plan.token_mask.to(acc)))


def backward(dy, x, weights, plan, weight_on_input, act, grads):
    """Writes grads; returns (d row weight [R], d leader weight [R])."""
    _check(weight_on_input)
    w1, w2, a1, a2 = weights
    I, Ia = weights.intermediate
    S, off, E = plan.group_size, plan.expert_offsets, plan.num_experts
    h, z = act.h[0], act.z[0]
    he, ha, ze, za = h[:, :2 * I], h[:, 2 * I:], z[:, :I], z[:, I:]
    a1e, a2e = _per_expert(a1, S), _per_expert(a2, S)
    acc = acc_dtype(x.dtype)
    dyr = dy.to(acc)[plan.row_token]
    w = plan.row_weight[:, None].to(acc)
    lw = plan.leader_weight[:, None].to(acc)
    d_row_weight = (dyr * ref.gmm(ze, w2, off, True).to(acc)).sum(-1)
    # za is zero on rows that lead no group: so are their A2 products and d leader weight.
    d_leader_weight = (dyr * ref.gmm(za, a2e, off, True).to(acc)).sum(-1)
    d_oe, d_oa = (dyr * w).to(x.dtype), (dyr * lw).to(x.dtype)
    dx_, dw1, dw2, da1, da2 = grads
    dw2.copy_(ref.gmm_wgrad(d_oe, ze, off, E))
    da2.copy_(_group_sum(ref.gmm_wgrad(d_oa, za, off, E), S))
    dhe = ref.swiglu_backward(he, ref.gmm(d_oe, w2, off, False))
    dha = ref.swiglu_backward(ha, ref.gmm(d_oa, a2e, off, False))  # 0 where d_oa is
    xr = x[plan.row_token]
    dw1.copy_(ref.gmm_wgrad(dhe, xr, off, E))
    da1.copy_(_group_sum(ref.gmm_wgrad(dha, xr, off, E), S))
    dxr = ref.gmm(dhe, w1, off, False).to(acc) + ref.gmm(dha, a1e, off, False).to(acc)
    dx_.copy_(ref._gather_sum(plan, dxr, plan.token_mask.to(acc)))
    return d_row_weight, d_leader_weight
