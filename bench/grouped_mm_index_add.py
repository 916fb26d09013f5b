"""The first torch._grouped_mm Grove layer of the bench, kept as the `grouped_mm-index_add`
variants so that a GPU run shows what its form costs beside the usual one
(bench.grouped_mm_layer). Not the baseline any more: nothing new should copy it.

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

Where its time goes (H200, grove-33b, T = 16384, plain forward: 7851 µs, against 2.9 ms for
a forward-only layer of the usual form on an H100). Hypotheses, R = T·k = 131072 rows, to be
checked by the next GPU run (`grouped_mm-index_add*` beside `grouped_mm*`) and a profile:
  1. fp32 [R, H] passes: o.float() (1 GiB written), torch.where on it (1 GiB read + written),
     × weight (again): ~3 GiB of traffic, ~1 ms at 3 TB/s, and as much again in backward
     (the where's, the multiply's and the cast's backward each make an [R, H] fp32 tensor).
  2. index_add of R fp32 rows into y [T, H] fp32: R·H = 268 M atomic adds, k = 8 rows per
     destination; its backward is an index_select making another [R, H] fp32 tensor.
  3. The plain layer masks too (valid is all-true there): two selects over [R, H] it does
     not need, ~0.7 ms with their backward.
  4. Copies of transposed weights: grouped_mm gets w1.transpose(1, 2) (column-major B); if
     the kernel wants the other major for some operand (the backward's dX = dH · W1 reads W1
     row-major), aten copies [E, 2I, H] per call. Same in the usual form: it would not
     explain the gap, but it would show in both.
  5. Two sorts and two gathers per Grove call (one per section): the usual form has them too.
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


def grouped_mm_index_add_moe(x, w1, w2, topk_weights, topk_ids, a1=None, a2=None, *,
                              group_size=2, adjugate_scale=0.05):
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
