"""The Grove layer (and the plain MoE layer) from torch._grouped_mm + autograd: the "grouped
GEMM library" baseline of DESIGN §6. Everything has a fixed size (no host reads), so it
captures in a CUDA graph.

    x [T, H], topk_ids [T, k], topk_weights [T, k] fp32
    experts:    T·k rows, key = expert id                       -> w1 [E, 2I, H], w2 [E, H, I]
    adjugates:  T·k rows, key = group id for the FIRST slot of each (token, group), else G
                (a sentinel that sorts past the last problem, so the duplicate is never computed);
                row weight λ · Σ_{j: ids_tj // S = g} w_tj   -> a1 [G, 2Ia, H], a2 [G, H, Ia]
    per section: stable sort by key -> offs [P] (end of each problem, searchsorted, no sync)
                 -> gather x rows -> grouped_mm (2I or 2Ia) -> SwiGLU -> grouped_mm (H)
                 -> × row weight -> index_add into y [T, H] fp32 -> y in x's dtype.

grouped_mm leaves rows past offs[-1] unspecified (uninitialised memory on CUDA), so those rows
are masked with torch.where on the way in and out, before any multiply: a select, unlike a
multiply by 0, stops NaN garbage in both directions (forward values and every gradient).
"""
import torch
import torch.nn.functional as F


def _swiglu_rows(x, w1, w2, token, key, weight, num_problems, out):
    """out[token[r]] += weight[r] · W2_key (silu(Wg x) ⊙ (Wu x)) for every row r with
    key[r] < num_problems. token, key [R] int64; weight [R] fp32; out [T, H] fp32."""
    order = torch.argsort(key, stable=True)
    key_sorted = key[order]
    problems = torch.arange(1, num_problems + 1, device=key.device, dtype=key.dtype)
    offs = torch.searchsorted(key_sorted, problems).to(torch.int32)
    valid = (key_sorted < num_problems).unsqueeze(1)
    tok = token[order]
    xs = torch.where(valid, x[tok], 0)
    # w1.transpose(1, 2) is [P, H, 2I] with unit stride along H: the K-major B that the
    # CUTLASS/cuBLAS grouped kernels want, so no copy is made.
    h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
    inter = w2.shape[-1]
    act = F.silu(h[:, :inter]) * h[:, inter:]
    o = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)
    # Mask before weighting: d weight = Σ_H g · o, and 0 · garbage can be NaN.
    o = torch.where(valid, o.float(), 0) * weight[order].unsqueeze(1)
    return out.index_add(0, tok, o)


def grouped_mm_moe(x, w1, w2, topk_weights, topk_ids, a1=None, a2=None, *, group_size=2,
                   adjugate_scale=0.05):
    """Plain MoE (a1 is None) or Grove layer output [T, H] in x's dtype."""
    T, k = topk_ids.shape
    ids = topk_ids.long()
    token = torch.arange(T, device=x.device).repeat_interleave(k)
    out = torch.zeros(T, x.shape[1], device=x.device, dtype=torch.float32)
    out = _swiglu_rows(x, w1, w2, token, ids.reshape(-1), topk_weights.reshape(-1),
                       w1.shape[0], out)
    if a1 is not None:
        groups = ids // group_size  # [T, k]
        same = groups.unsqueeze(2) == groups.unsqueeze(1)  # [T, k, k]: slots j, m share a group
        group_weight = (same * topk_weights.unsqueeze(1)).sum(-1)  # [T, k]: Σ w over j's group
        earlier = torch.ones(k, k, dtype=torch.bool, device=x.device).tril(-1)
        first = ~(same & earlier).any(-1)  # slot j is its group's first slot in the row
        num_groups = a1.shape[0]
        key = torch.where(first, groups, num_groups)
        out = _swiglu_rows(x, a1, a2, token, key.reshape(-1),
                           (adjugate_scale * group_weight).reshape(-1), num_groups, out)
    return out.to(x.dtype)
