"""The `cuda` backend's experts stage: CUTLASS grouped GEMMs (csrc/gemm) between the CUDA row
kernels (gather, SwiGLU, combine), over a Plan (protocol in grove_kernels/experts.py). Each GEMM
stage is one launch over both sections (experts, adjugates); kernels are named by what varies
(ext.gemm_kernel: m- or k-grouped, operand majors, epilogue, schedule).

Two adjugate layouts, by the plan's: `sections` (below: E expert + G adjugate problems, the
adjugate rows gathered and combined separately) and `folded` (cuda/folded.py, whose docstring
lists each launch, its problems and what it reads and writes: the adjugates ride on their
group's leader expert rows; 1 gather, GEMM-1 with 2E problems, one SwiGLU row kernel, GEMM-2
with 2E problems, the combine over k rows per token).

Sections layout, every launch (R_e = T·k, R_a = T·min(k, G) rows; counts are per call):

Forward (x [T, H]; R = R_e + R_a plan rows; N = I for experts, Ia for adjugates):
    gather          x[row_token] (· w when the router weight is applied on the input) -> xg [R, H]
    GEMM-1   m-grouped nt, SwiGLU fused (settings.fused_gemm1; w1 / a1 in place): xg @ w1|a1 -> z
             otherwise m-grouped nt -> h [R, 2N], then the SwiGLU kernel -> z [R, N]
    GEMM-2   m-grouped nt  z @ w2|a2 -> o [R, H]
    combine         y_t = Σ_j token_weight[t, j] · o[token_rows[t, j]]  (fp32, slot order)
The row weights are applied in the combine (fp32), not in GEMM-2's epilogue: same bytes, one
rounding fewer. A training forward writes h and z into the activations (never fused).

Backward (h and z from the activations; no GEMM-1):
    gather          xg as above; dY[row_token] -> dyg [R, H]
    dGEMM-2  m-grouped nn   dyg @ w2|a2 -> g [R, N]
    SwiGLU'         dh [R, 2N] = f(g, h, w) (w = 1 on input); d row weight = Σ_n g·z
    dW2 / dA2  k-grouped tn Σ_rows dyg^T (w·z) -> [E, H, I], [G, H, Ia]  (no rows: zeros)
    dW1 / dA1  k-grouped tn Σ_rows dh^T xg -> [E, 2I, H], [G, 2Ia, H]
    dGEMM-1  m-grouped nn   dh @ w1|a1 -> dx rows [R, H]
    on input        d row weight = <dx row, x_t>, then dx row · w    (rows_dot_scale)
    combine         dx_t = Σ_j dx rows
"""
import torch

from ..settings import fused_gemm1
from . import ext as lib
from . import folded

class _Call:
    """Sizes of one call and the per-section views every stage uses."""

    def __init__(self, x, weights, plan):
        self.plan = plan
        self.grove = weights.grove
        self.Re, self.R = plan.num_expert_rows, plan.num_rows
        self.I, self.Ia = weights.intermediate
        # The row kernels take fp32 weights; the plan's follow topk_weights (fp64 possible).
        self.row_weight, self.token_weight = plan.row_weight.float(), plan.token_weight.float()
        self.start, self.count = plan.problem_start, plan.problem_count
        self.end_e = plan.expert_offsets[plan.num_experts:]
        self.end_a = plan.adjugate_offsets[plan.num_groups:] if self.grove else None
        self.schedule = lib.m_grouped_schedule(plan)
        self.dtype = x.dtype

    def split(self, t):
        """Expert and adjugate sections of a [R, ...] row buffer (adjugate None when plain)."""
        return (t[:self.Re], t[self.Re:]) if self.grove else (t, None)

    def sections(self, *items):
        """Drop the adjugate entries of a plain call: lists of 1 or 2 sections."""
        return [list(i[:2] if self.grove else i[:1]) for i in items]

    def gemm(self, a, b, out, grouped, majors, epilogue=None):
        """One grouped GEMM over both sections (a, b, out: per-section pairs)."""
        schedule = "coop" if grouped == "k" else self.schedule
        kernel = lib.gemm_kernel(self.dtype, grouped, majors, epilogue=epilogue,
                                 schedule=schedule)
        a, b, out = self.sections(a, b, out)
        lib.grouped_gemm(a, b, out, self.start, self.count, kernel)


def _gather(c, src, weight):
    out = src.new_empty(c.R, src.shape[1])
    return lib.gather_rows(src, c.plan.row_token, weight, c.Re, c.end_e, c.end_a, out)


def _gemm1_swiglu(c, xg, w1, a1, act):
    """z per section; a training forward (act) writes h and z into the activations."""
    fused = fused_gemm1(train=act is not None)
    if act is not None:
        (he, ha), (ze, za) = act.h, act.z
    else:
        ze = xg.new_empty(c.Re, c.I)
        za = xg.new_empty(c.R - c.Re, c.Ia) if c.grove else None
    if fused:
        c.gemm(c.split(xg), (w1, a1), (ze, za), "m", "nt", epilogue="swiglu")
        return ze, za
    if act is None:
        he = xg.new_empty(c.Re, 2 * c.I)
        ha = xg.new_empty(c.R - c.Re, 2 * c.Ia) if c.grove else None
    c.gemm(c.split(xg), (w1, a1), (he, ha), "m", "nt")
    lib.swiglu_fwd(he, c.end_e, ze)
    if c.grove:
        lib.swiglu_fwd(ha, c.end_a, za)
    return ze, za


def forward(x, weights, plan, weight_on_input, y, act):
    if plan.layout == "folded":
        return folded.forward(x, weights, plan, weight_on_input, y, act)
    c = _Call(x, weights, plan)
    w1, w2, a1, a2 = weights
    xg = _gather(c, x, c.row_weight if weight_on_input else None)
    z = _gemm1_swiglu(c, xg, w1, a1, act)
    o = x.new_empty(c.R, x.shape[1])
    c.gemm(z, (w2, a2), c.split(o), "m", "nt")
    lib.combine_rows(o, plan.token_rows, plan.token_mask,
                     None if weight_on_input else c.token_weight, y)


def backward(dy, x, weights, plan, weight_on_input, act, grads):
    if plan.layout == "folded":
        return folded.backward(dy, x, weights, plan, weight_on_input, act, grads)
    c = _Call(x, weights, plan)
    w1, w2, a1, a2 = weights
    dx, dw1, dw2, da1, da2 = grads
    (he, ha), (ze, za) = act.h, act.z
    row_w = c.row_weight
    xg = _gather(c, x, row_w if weight_on_input else None)
    dyg = _gather(c, dy, None)

    # dGEMM-2: g = dY·W2 per row, then SwiGLU' with the output-side row weight.
    ge = x.new_empty(c.Re, c.I)
    ga = x.new_empty(c.R - c.Re, c.Ia) if c.grove else None
    c.gemm(c.split(dyg), (w2, a2), (ge, ga), "m", "nn")
    # Every row is written: by SwiGLU' per section, or on the input side by rows_dot_scale.
    d_row_weight = torch.empty(c.R, dtype=torch.float32, device=x.device)
    dre, dra = c.split(d_row_weight)
    we, wa = c.split(row_w)
    out_w = (None, None) if weight_on_input else (we, wa)
    # On the input side d row weight comes from dGEMM-1 (rows_dot_scale) instead.
    dre, dra = (None, None) if weight_on_input else (dre, dra)
    dhe = lib.swiglu_bwd(ge, he, out_w[0], c.end_e, torch.empty_like(he), dre)
    dha = (lib.swiglu_bwd(ga, ha, out_w[1], c.end_a, torch.empty_like(ha), dra)
           if c.grove else None)

    # dW2 = Σ_rows dY_t ⊗ (w·z): z is scaled on a copy (a second backward reads the saved z).
    if not weight_on_input:
        ze = lib.rows_dot_scale(ze.clone(), ze, plan.row_token[:c.Re], we, c.Re, c.end_e, None,
                                None)
        if c.grove:
            za = lib.rows_dot_scale(za.clone(), za, plan.row_token[c.Re:], wa, c.R - c.Re,
                                    c.end_a, None, None)
    c.gemm(c.split(dyg), (ze, za), (dw2, da2), "k", "tn")
    c.gemm((dhe, dha), c.split(xg), (dw1, da1), "k", "tn")

    dx_rows = x.new_empty(c.R, x.shape[1])
    c.gemm((dhe, dha), (w1, a1), c.split(dx_rows), "m", "nn")
    if weight_on_input:
        lib.rows_dot_scale(dx_rows, x, plan.row_token, row_w, c.Re, c.end_e, c.end_a,
                           d_row_weight)
    lib.combine_rows(dx_rows, plan.token_rows, plan.token_mask, None, dx)
    return d_row_weight
