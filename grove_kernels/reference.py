"""The `torch` backend: the readable semantics of the experts stage, vectorized, on any device
(protocol in experts.py; the backend object is backends.TorchBackend).

Forward, with a Plan (rows sorted by problem, R_e = T*k, R_a = T*ka):

    x [T, H] --gather rows--> xe [R_e, H], xa [R_a, H]
    GEMM-1   he = xe @ w1[e]^T  [R_e, 2I]    ha = xa @ a1[g]^T  [R_a, 2Ia]   (grouped by problem)
    SwiGLU   ze = silu(he[:, :I]) * he[:, I:]  (fp32 math, stored in the input dtype)
    GEMM-2   oe = ze @ w2[e]^T  [R_e, H]     oa = za @ a2[g]^T  [R_a, H]
    combine  y_t = Σ_j token_weight[t, j] · o[token_rows[t, j]]   (fp32, fixed slot order)

A training forward keeps h and z of every row. Backward: dY -> d row weights, dO -> dZ
(dgrad) and dW2 (wgrad, K = rows) -> SwiGLU backward (saved h) -> dH -> dX rows (dgrad) and
dW1 (wgrad) -> dX_t = Σ_j dX rows (fixed order).

Each grouped matmul uses torch._grouped_mm where it is a native kernel (bf16 on sm_90+, no
host sync); elsewhere it loops over the problems with their offsets read on the host, which is
a sync on a GPU (fp16/fp32 there) and free on the CPU.
"""
import torch
import torch.nn.functional as F

from .routing import acc_dtype

# Tests flip this to exercise the per-problem loop where _grouped_mm would be taken.
use_grouped_mm = True


def _native_grouped_mm(a, b):
    if not (use_grouped_mm and a.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    # 16-byte aligned strides on every operand (CUTLASS TMA requirement behind _grouped_mm).
    return all(d % 8 == 0 for d in (a.shape[-1], b.shape[-1], b.shape[-2]))


def _host_bounds(offsets):
    return offsets.tolist()


def gmm(a, b, offsets, trans_b):
    """out[r] = a[r] @ (b[p]^T if trans_b else b[p]) for rows r of problem p; [R, N].

    a [R, K]; b [P, N, K] (trans_b) or [P, K, N]; offsets [P+1]. Rows past offsets[P]: zeros.
    """
    R = a.shape[0]
    N = b.shape[-2] if trans_b else b.shape[-1]
    if R == 0:
        return a.new_zeros(0, N)
    if _native_grouped_mm(a, b):
        mat_b = b.transpose(-2, -1) if trans_b else b
        out = torch._grouped_mm(a, mat_b, offs=offsets[1:].to(torch.int32))
        # Rows past the last problem are left unwritten; saved activations must not hold them.
        real = torch.arange(R, device=a.device) < offsets[-1]
        return torch.where(real[:, None], out, 0)
    out = a.new_zeros(R, N)
    bounds = _host_bounds(offsets)
    upcast = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
    for p in range(b.shape[0]):
        lo, hi = bounds[p], bounds[p + 1]
        if hi > lo:
            bp = b[p].t() if trans_b else b[p]
            if upcast:  # CPU half matmuls are slow and not guaranteed fp32-accumulated
                out[lo:hi] = (a[lo:hi].float() @ bp.float()).to(a.dtype)
            else:
                out[lo:hi] = a[lo:hi] @ bp
    return out


def gmm_wgrad(a, b, offsets, num_problems):
    """out[p] = Σ_{r in problem p} a[r]^T b[r]: [P, Na, Nb]; problems with no rows get zeros."""
    Na, Nb = a.shape[-1], b.shape[-1]
    if a.shape[0] and _native_grouped_mm(a, b):
        out = torch._grouped_mm(a.t(), b, offs=offsets[1:].to(torch.int32))
        # K = 0 problems are not guaranteed to be written (accumulators start undefined).
        return torch.where((offsets.diff() > 0)[:, None, None], out, 0)
    out = a.new_zeros(num_problems, Na, Nb)
    if a.shape[0] == 0:
        return out
    bounds = _host_bounds(offsets)
    upcast = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
    for p in range(num_problems):
        lo, hi = bounds[p], bounds[p + 1]
        if hi > lo:
            if upcast:
                out[p] = (a[lo:hi].float().t() @ b[lo:hi].float()).to(a.dtype)
            else:
                out[p] = a[lo:hi].t() @ b[lo:hi]
    return out


def swiglu(h):
    gate, up = h.to(acc_dtype(h.dtype)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def swiglu_backward(h, dz):
    gate, up = h.to(acc_dtype(h.dtype)).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dz = dz.to(gate.dtype)
    d_gate = dz * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, dz * silu], dim=-1).to(h.dtype)


def _sections(plan, weights, act):
    """(token rows, row weights, offsets, W1, W2, h, z) of each section present."""
    rows = [(plan.expert_token, plan.expert_weight, plan.expert_offsets)]
    if plan.num_groups:
        rows.append((plan.adjugate_token, plan.adjugate_weight, plan.adjugate_offsets))
    w1, w2, a1, a2 = weights
    saved = zip(act.h, act.z) if act is not None else [(None, None)] * 2
    return [r + w + a for r, w, a in zip(rows, [(w1, w2), (a1, a2)], saved)]


def _input_rows(x, token, weight, weight_on_input):
    xr = x[token]
    if weight_on_input:
        xr = (xr.to(weight.dtype) * weight[:, None]).to(x.dtype)
    return xr


def _gather_sum(plan, rows, weight):
    """Σ_j weight[t, j] · rows[token_rows[t, j]] in fp32, slots in fixed order: [T, H]."""
    acc = rows.new_zeros(plan.num_tokens, rows.shape[-1], dtype=acc_dtype(rows.dtype))
    for j in range(plan.token_rows.shape[1]):
        part = rows[plan.token_rows[:, j]].to(acc.dtype) * weight[:, j, None]
        acc += torch.where(plan.token_mask[:, j, None], part, 0.0)
    return acc


def forward(x, weights, plan, weight_on_input, y, act):
    if plan.layout == "folded":
        from . import reference_folded
        return reference_folded.forward(x, weights, plan, weight_on_input, y, act)
    outs = []
    for token, weight, offsets, wa, wb, h_out, z_out in _sections(plan, weights, act):
        h = gmm(_input_rows(x, token, weight, weight_on_input), wa, offsets, True)
        z = swiglu(h)
        if act is not None:
            h_out.copy_(h)
            z_out.copy_(z)
        outs.append(gmm(z, wb, offsets, True))
    rows = torch.cat(outs)
    token_weight = plan.token_weight
    if weight_on_input:  # the weights were applied to the input rows
        token_weight = plan.token_mask.to(token_weight.dtype)
    y.copy_(_gather_sum(plan, rows, token_weight))


def backward(dy, x, weights, plan, weight_on_input, act, grads):
    if plan.layout == "folded":
        from . import reference_folded
        return reference_folded.backward(dy, x, weights, plan, weight_on_input, act, grads)
    dy = dy.to(acc_dtype(x.dtype))
    d_row_weight, dx_rows = [], []
    for (token, weight, offsets, wa, wb, h, z), (d_wa, d_wb) in zip(
            _sections(plan, weights, act), grads.sections()):
        P = wa.shape[0]
        dyr = dy[token]
        if weight_on_input:
            d_o = dyr.to(x.dtype)
        else:
            d_row_weight.append((dyr * gmm(z, wb, offsets, True).to(dy.dtype)).sum(-1))
            d_o = (dyr * weight[:, None]).to(x.dtype)
        d_wb.copy_(gmm_wgrad(d_o, z, offsets, P))  # dW2 | dA2
        dh = swiglu_backward(h, gmm(d_o, wb, offsets, False))
        xr = _input_rows(x, token, weight, weight_on_input)
        d_wa.copy_(gmm_wgrad(dh, xr, offsets, P))  # dW1 | dA1
        dxr = gmm(dh, wa, offsets, False)
        if weight_on_input:
            d_row_weight.append((dxr.to(dy.dtype) * x[token].to(dy.dtype)).sum(-1))
            dxr = (dxr.to(dy.dtype) * weight[:, None]).to(x.dtype)
        dx_rows.append(dxr)
    grads.dx.copy_(_gather_sum(plan, torch.cat(dx_rows), plan.token_mask.to(dy.dtype)))
    return torch.cat(d_row_weight)
