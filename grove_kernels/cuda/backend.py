"""The `cuda` backend's MoE layer: CUTLASS grouped GEMMs (csrc/gemm) between the row kernels
of csrc/rows.cu, on the plan built by the Triton plan kernels (issue 3; no CUDA plan kernels).

Forward (x [T, H]; R = R_e + R_a plan rows; N = I for experts, Ia for adjugates):
    gather          x[row_token] (· w when the router weight is applied on the input) -> xg [R, H]
    GEMM-1   tn_swiglu  xg rows @ packed(w1[e])^T | packed(a1[g])^T, SwiGLU in the epilogue
                    -> z_e [R_e, I], z_a [R_a, Ia]                                    one launch
             (FUSE_SWIGLU off, the default: GEMM-1 tn -> h [R, 2N], then the SwiGLU kernel)
    GEMM-2   tn     z rows @ w2[e]^T | a2[g]^T -> o [R, H]                          one launch
    combine         y_t = Σ_j token_weight[t, j] · o[token_rows[t, j]]  (fp32, slot order)
The row weights are applied in the combine (fp32), not in GEMM-2's epilogue: same bytes, one
rounding fewer.

Packed weights (PackedGateUp, opt-in with cuda.FUSE_SWIGLU = True): the fused GEMM-1 reads
w1 / a1 with gate and up rows interleaved in blocks of 8 (cuda.pack_gate_up), a copy kept per
weight tensor while its version is unchanged. For frozen (inference) weights: packing costs a
copy of w1 (E·2I·H elements) while fusing saves ~R·4N per call, so weights updated every step
(training) are better left unfused, and a packed copy cannot see writes torch does not version.

Training forward (ops.experts_forward_train, saved given): GEMM-1 unfused, its h = [gate | up]
written into `saved` (saved_numel elements: [R_e, 2I] then [R_a, 2Ia]) for the backward.

Backward (same plan):
    gather          xg as above; dY[row_token] -> dyg [R, H]
    h               from `saved` (no GEMM-1: by FLOPs forward + backward = 3x forward instead of
                    3.67x), or GEMM-1 recomputed when called without it
    SwiGLU          h -> z
    dGEMM-2  tt     dyg rows @ w2[e] | a2[g] -> g [R, N]
    SwiGLU'         dh [R, 2N] = f(g, h, w) (w = 1 on input); d row weight = Σ_n g·z
    z · w           in place (output-side weights only)
    dW2 / dA2  nt   Σ_rows dyg^T (w·z) -> [E, H, I], [G, H, Ia]   (problems without rows: zeros)
    dW1 / dA1  nt   Σ_rows dh^T xg -> [E, 2I, H], [G, 2Ia, H]
    dGEMM-1  tt     dh rows @ w1[e] | a1[g] -> dx rows [R, H]
    on input        d row weight = <dx row, x_t>, then dx row · w    (rows_dot_scale)
    combine         dx_t = Σ_j dx rows;   d topk_weights from d row weight (Plan)
"""
import weakref

import torch

from .. import cuda as pkg
from . import ext as lib
from .ext import DTYPES, is_available  # noqa: F401  (the backend registry reads them)

runs_on_cpu = False
AUTO = False

# Rows per expert up to which the ping-pong 64x128 tile wins (DESIGN §4, GEMM-1, H100).
_PINGPONG_MAX_ROWS_PER_EXPERT = 64


def topk(router_logits, top_k, renormalize, selection_bias):
    from ..triton.routing import topk as triton_topk

    return triton_topk(router_logits, top_k, renormalize, selection_bias)


def _check(x, w1, w2, a1, a2):
    if x.dtype not in lib.DTYPES:
        raise TypeError(f"hidden_states: the cuda backend supports bfloat16 and float16, got "
                        f"{x.dtype}; use the triton or torch backend")
    sizes = {"H": x.shape[1], "I": w1.shape[1] // 2}
    if a1 is not None:
        sizes["Ia"] = a1.shape[1] // 2
    odd = {k: v for k, v in sizes.items() if v % 8}
    if odd:
        raise ValueError(f"w1: the cuda backend needs H, I and Ia multiples of 8 (16-byte TMA "
                         f"rows), got {odd}; use the triton backend")
    for name, w in (("w1", w1), ("w2", w2), ("a1", a1), ("a2", a2)):
        if w is not None and not w.is_contiguous():
            raise ValueError(f"{name}: the cuda backend needs contiguous weights, got strides "
                             f"{w.stride()}")


class _Call:
    """The plan of one call and the per-kind views every stage uses."""

    def __init__(self, x, w1, a1, topk_weights, topk_ids, expert_map, group_size,
                 adjugate_scale):
        from ..triton.plan import build_plan

        self.grove = a1 is not None
        self.skips = expert_map is not None  # slots mapped to -1: expert rows of no problem
        self.plan = build_plan(topk_ids, topk_weights, w1.shape[0],
                               group_size if self.grove else 0, adjugate_scale, expert_map)
        p = self.plan
        self.E, self.G = p.num_experts, p.num_groups
        self.Re, self.R = p.num_expert_rows, p.num_rows
        self.I = w1.shape[1] // 2
        self.Ia = a1.shape[1] // 2 if self.grove else 0
        # The row kernels take fp32 weights; the plan's follow topk_weights (fp64 possible).
        self.row_weight, self.token_weight = p.row_weight.float(), p.token_weight.float()
        self.start, self.count = p.problem_rows()
        self.end_e = p.expert_offsets[self.E:]
        self.end_a = p.adjugate_offsets[self.G:] if self.grove else None
        rows_per_expert = p.num_tokens * p.top_k / max(self.E, 1)
        self.tile = ("pingpong_64x128_c11" if rows_per_expert <= _PINGPONG_MAX_ROWS_PER_EXPERT
                     else "coop_128x256_c11")
        self.dtype = x.dtype

    def split(self, t):
        """Expert and adjugate sections of a [R, ...] row buffer (adjugate None when plain)."""
        return (t[:self.Re], t[self.Re:]) if self.grove else (t, None)

    def segments(self, *items):
        """Drop the adjugate entries of a plain call: lists of 1 or 2 segments."""
        return [list(i[:2] if self.grove else i[:1]) for i in items]

    def config(self, layout):
        return lib.gemm_config(self.dtype, layout, "coop_128x256_c11" if layout == "nt"
                               else self.tile)


def _capturing(t):
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class PackedGateUp:
    """cuda.pack_gate_up copies of w1 / a1 for the fused GEMM-1 (opt-in: cuda.FUSE_SWIGLU).

    One copy per live weight tensor, made on its first eager forward and replaced when the
    tensor's version changes (an in-place update made through torch). Writes torch does not
    version (w.data.copy_, collectives or kernels writing through data_ptr) are NOT seen: with
    FUSE_SWIGLU on, weights must stay frozen, or release_packed_weights() be called after
    changing them. Never packs while a CUDA graph is being captured; a graph captured with a
    packed copy keeps reading that copy, so it is pinned (kept alive) until release.
    """

    def __init__(self):
        self._entries = {}  # id(w) -> (weakref to w, state of w, packed copy)
        self._pinned = []  # packed copies that captured graphs may read

    @staticmethod
    def _state(w):
        # Inference tensors have no version counter: their values count as frozen.
        version = None if w.is_inference() else w._version
        return (version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device)

    def get(self, w):
        """The packed copy of w, or None while capturing a graph without one."""
        key, state = id(w), self._state(w)
        entry = self._entries.get(key)
        valid = entry is not None and entry[0]() is w and entry[1] == state
        if _capturing(w):
            if not valid:
                return None
            if not any(p is entry[2] for p in self._pinned):
                self._pinned.append(entry[2])
            return entry[2]
        if not valid:
            entries = self._entries
            ref = weakref.ref(w, lambda _, k=key: entries.pop(k, None))
            entry = (ref, state, lib.pack_gate_up(w))
            self._entries[key] = entry
        return entry[2]

    def clear(self):
        self._entries.clear()
        self._pinned.clear()


packed_gate_up = PackedGateUp()


def _gather(c, src, weight):
    out = src.new_empty(c.R, src.shape[1])
    return lib.gather_rows(src, c.plan.row_token, weight, c.Re, c.end_e, c.end_a, out)


def _packed_weights(c, w1, a1):
    """Packed (w1, a1) for the fused GEMM-1, or None (not enabled, or not packed yet)."""
    if not pkg.FUSE_SWIGLU:
        return None
    packed = [packed_gate_up.get(w) for w in ((w1, a1) if c.grove else (w1,))]
    if any(p is None for p in packed):
        return None
    return packed[0], (packed[1] if c.grove else None)


def saved_numel(T, k, E, G, I, Ia):
    """Elements of a training forward's `saved`: GEMM-1's pre-activations of every plan row
    (R_e = T·k rows of 2I, R_a = T·min(k, G) rows of 2Ia; the plan's fixed upper bounds)."""
    return T * k * 2 * I + (T * min(k, G) * 2 * Ia if G else 0)


def _saved_h(c, saved):
    he = saved[:c.Re * 2 * c.I].view(c.Re, 2 * c.I)
    ha = saved[c.Re * 2 * c.I:].view(c.R - c.Re, 2 * c.Ia) if c.grove else None
    return he, ha


def _zero_unwritten(c, he, ha):
    """Zero the saved sections holding rows of no problem, which GEMM-1 never writes (an op
    output must not hold allocator leftovers): the adjugate section's tail, and expert rows of
    skipped slots. Without an expert_map every expert row is real: no memset there."""
    if c.skips:
        he.zero_()
    if ha is not None:
        ha.zero_()


def _swiglu(c, he, ha):
    ze = lib.swiglu_fwd(he, c.end_e, he.new_empty(c.Re, c.I))
    za = lib.swiglu_fwd(ha, c.end_a, ha.new_empty(c.R - c.Re, c.Ia)) if c.grove else None
    return ze, za


def _gemm1_swiglu(c, xg, w1, a1, keep_h, saved=None):
    xe, xa = c.split(xg)
    packed = None if keep_h or saved is not None else _packed_weights(c, w1, a1)
    if packed is not None:
        ze = xg.new_empty(c.Re, c.I)
        za = xg.new_empty(c.R - c.Re, c.Ia) if c.grove else None
        a, b, out = c.segments((xe, xa), packed, (ze, za))
        lib.grouped_gemm(a, b, out, c.start, c.count, c.config("tn_swiglu"))
        return (ze, za), None
    if saved is not None:
        he, ha = _saved_h(c, saved)
        _zero_unwritten(c, he, ha)
    else:
        he = xg.new_empty(c.Re, 2 * c.I)
        ha = xg.new_empty(c.R - c.Re, 2 * c.Ia) if c.grove else None
    a, b, out = c.segments((xe, xa), (w1, a1), (he, ha))
    lib.grouped_gemm(a, b, out, c.start, c.count, c.config("tn"))
    return _swiglu(c, he, ha), ((he, ha) if keep_h else None)


def experts_forward(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
                    adjugate_scale, weight_on_input, saved=None):
    _check(x, w1, w2, a1, a2)
    T, H = x.shape
    y = x.new_empty(T, H)
    x = x.contiguous()
    c = _Call(x, w1, a1, topk_weights, topk_ids, expert_map, group_size, adjugate_scale)
    xg = _gather(c, x, c.row_weight if weight_on_input else None)
    (ze, za), _ = _gemm1_swiglu(c, xg, w1, a1, keep_h=False, saved=saved)
    o = x.new_empty(c.R, H)
    a, b, out = c.segments((ze, za), (w2, a2), c.split(o))
    lib.grouped_gemm(a, b, out, c.start, c.count, c.config("tn"))
    p = c.plan
    return lib.combine_rows(o, p.token_rows, p.token_mask,
                            None if weight_on_input else c.token_weight, y)


def experts_backward(grad_out, x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map,
                     group_size, adjugate_scale, weight_on_input, saved=None):
    _check(x, w1, w2, a1, a2)
    H = x.shape[1]
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    da1 = torch.empty_like(a1) if a1 is not None else None
    da2 = torch.empty_like(a2) if a2 is not None else None
    x = x.contiguous()
    dy = grad_out.to(x.dtype).contiguous()
    c = _Call(x, w1, a1, topk_weights, topk_ids, expert_map, group_size, adjugate_scale)
    p = c.plan
    row_w = c.row_weight
    xg = _gather(c, x, row_w if weight_on_input else None)
    dyg = _gather(c, dy, None)
    if saved is not None:
        he, ha = _saved_h(c, saved)
        ze, za = _swiglu(c, he, ha)
    else:
        (ze, za), (he, ha) = _gemm1_swiglu(c, xg, w1, a1, keep_h=True)

    # dGEMM-2: g = dY·W2 per row, then SwiGLU' with the output-side row weight.
    ge = x.new_empty(c.Re, c.I)
    ga = x.new_empty(c.R - c.Re, c.Ia) if c.grove else None
    a, b, out = c.segments(c.split(dyg), (w2, a2), (ge, ga))
    lib.grouped_gemm(a, b, out, c.start, c.count, c.config("tt"))
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

    # dW2 = Σ_rows dY_t ⊗ (w·z): scale z in place (its unweighted values are used up).
    if not weight_on_input:
        lib.rows_dot_scale(ze, ze, p.row_token[:c.Re], we, c.Re, c.end_e, None, None)
        if c.grove:
            lib.rows_dot_scale(za, za, p.row_token[c.Re:], wa, c.R - c.Re, c.end_a, None, None)
    a, b, out = c.segments(c.split(dyg), (ze, za), (dw2, da2))
    lib.grouped_gemm(a, b, out, c.start, c.count, c.config("nt"))
    a, b, out = c.segments((dhe, dha), c.split(xg), (dw1, da1))
    lib.grouped_gemm(a, b, out, c.start, c.count, c.config("nt"))

    dx_rows = x.new_empty(c.R, H)
    a, b, out = c.segments((dhe, dha), (w1, a1), c.split(dx_rows))
    lib.grouped_gemm(a, b, out, c.start, c.count, c.config("tt"))
    if weight_on_input:
        lib.rows_dot_scale(dx_rows, x, p.row_token, row_w, c.Re, c.end_e, c.end_a, d_row_weight)
    dx = lib.combine_rows(dx_rows, p.token_rows, p.token_mask, None, x.new_empty(x.shape))
    d_topk = p.topk_weight_grad(d_row_weight, adjugate_scale)
    return dx, dw1, dw2, da1, da2, d_topk.to(topk_weights.dtype)
