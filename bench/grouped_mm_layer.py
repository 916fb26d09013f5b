"""The Grove layer (and the plain MoE layer) from torch._grouped_mm + autograd, written the way
a user writes an MoE layer on it (torchtitan / Hugging Face style): the "grouped GEMM library"
baseline of docs/design.md §6 and the `grouped_mm` / `grouped_mm-plain` bench variants.
Everything has a fixed size and nothing reads a tensor on the host, so it captures in a CUDA graph.

    x [T, H], topk_ids [T, k], topk_weights [T, k] fp32; R = T·k slots, slot j of token t is
    row t·k + j of the flattened routing.
    experts:   key = expert id [R] -> ONE stable sort -> order [R] (sorted position -> slot),
               offs [E] (end of each expert's rows: searchsorted, no sync)
               -> xs = x[order // k] [R, H] -> grouped_mm w1 [E, 2I, H] -> h [R, 2I]
               -> silu(gate) ⊙ up [R, I] -> grouped_mm w2 [E, H, I] -> o [R, H]
               -> un-permute: o_slots[order] = o (index_copy: a scatter forward, a gather
                  backward, no atomics) -> [T, k, H]
               -> y = bmm(w [T, 1, k], o_slots [T, k, H]) in x's dtype (fp32 accumulation)
    adjugates: key = group id ids // S for the first slot of each (token, group), else the
               sentinel G, so a token's duplicate groups sort past the last problem and are
               never computed (Σ_t d_t rows, as the fused layer); the same chain with
               a1 [G, 2Ia, H], a2 [G, H, Ia], and the slot weight λ · Σ_{j: ids_tj // S = g}
               w_tj (0 on a duplicate) -> y += bmm(w_adj, o_adj_slots) (one baddbmm).

No index_add, no fp32 [R, H] tensor, no mask on the plain layer (every slot belongs to an
expert, so offs[-1] = R). grouped_mm leaves the rows past offs[-1] unspecified (uninitialised
memory on CUDA and on the CPU alike, forward and in its dA backward), and the adjugate section
has such rows (the duplicates): there a torch.where on the gathered rows (whose backward stops
garbage reaching dx) and one on the output (which stops it reaching y and d weights; a multiply
by 0 would not: 0 · NaN is NaN) are the only masks, in x's dtype.

On the CPU (torch 2.13) torch._grouped_mm runs for fp32 / bf16 / fp16 when every stride is a
multiple of 16 bytes (H, I, Ia multiples of 4 in fp32): the tests run this very code against
the float64 oracle there, so there is no CPU fallback. It has no float64 kernel.
"""
import torch
import torch.nn.functional as F


def _check(x, w1, w2, topk_weights, topk_ids, a1, a2):
    if x.dim() != 2:
        raise ValueError(f"x: expected [T, H], got shape {tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids: expected [T={x.shape[0]}, k], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights: expected {tuple(topk_ids.shape)} like topk_ids, got "
                         f"{tuple(topk_weights.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError(f"topk_ids: expected an integer dtype, got {topk_ids.dtype}")
    if (a1 is None) != (a2 is None):
        raise ValueError("a1, a2: pass both (Grove layer) or neither (plain MoE)")
    for name, w in (("w1", w1), ("w2", w2), ("a1", a1), ("a2", a2)):
        if w is not None and w.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {w.dtype} differs from x's {x.dtype}")


def sort_slots(key, num_problems):
    """key [R] (values 0..P, P = the sentinel) -> order [R] int64 (stable: sorted position ->
    slot) and offs [P] int32 (the end of each problem's rows in sorted order)."""
    order = torch.argsort(key, stable=True)
    bounds = torch.arange(1, num_problems + 1, device=key.device, dtype=key.dtype)
    return order, torch.searchsorted(key[order], bounds).to(torch.int32)


def swiglu_experts(xs, w1, w2, offs):
    """Rows xs [R, H] sorted by problem -> [R, H]: W2_p (silu(gate) ⊙ up) with [gate | up] =
    W1_p x. Rows past offs[-1] of the result are unspecified."""
    # The transposes are views ([P, H, 2I] with unit stride along H): the column-major B the
    # grouped kernels take, not a copy.
    h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
    inter = w2.shape[-1]
    return torch._grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], w2.transpose(1, 2), offs=offs)


def _unpermute(o, order, T, k):
    """o [R, H] in sorted order -> [T, k, H] in slot order."""
    return o.new_empty(o.shape).index_copy(0, order, o).view(T, k, o.shape[1])


def adjugate_slots(topk_weights, topk_ids, group_size, num_groups, adjugate_scale):
    """(key [T, k], weight [T, k] fp32): a slot's group id if it is the first slot of its
    (token, group) in the row, else the sentinel num_groups; its weight λ · Σ w over the
    token's slots in that group, 0 on the duplicates."""
    k = topk_ids.shape[1]
    groups = topk_ids // group_size
    same = groups.unsqueeze(2) == groups.unsqueeze(1)  # [T, k, k]: slots j, m share a group
    group_weight = (same * topk_weights.unsqueeze(1)).sum(-1)
    earlier = torch.ones(k, k, dtype=torch.bool, device=topk_ids.device).tril(-1)
    first = ~(same & earlier).any(-1)
    key = torch.where(first, groups, num_groups)
    return key, torch.where(first, adjugate_scale * group_weight, 0.0)


def grouped_mm_moe(x, w1, w2, topk_weights, topk_ids, a1=None, a2=None, *, group_size=2,
                   adjugate_scale=0.05):
    """Plain MoE (a1 is None) or Grove layer output y [T, H] in x's dtype; differentiable in
    x, the weights and topk_weights."""
    _check(x, w1, w2, topk_weights, topk_ids, a1, a2)
    T, k = topk_ids.shape
    order, offs = sort_slots(topk_ids.reshape(-1), w1.shape[0])
    o = swiglu_experts(x[order // k], w1, w2, offs)
    y = torch.bmm(topk_weights.to(x.dtype).unsqueeze(1), _unpermute(o, order, T, k))
    if a1 is not None:
        num_groups = a1.shape[0]
        key, weight = adjugate_slots(topk_weights, topk_ids, group_size, num_groups,
                                     adjugate_scale)
        order, offs = sort_slots(key.reshape(-1), num_groups)
        valid = (torch.arange(T * k, device=x.device) < offs[-1]).unsqueeze(1)
        xs = torch.where(valid, x[order // k], 0)
        o = torch.where(valid, swiglu_experts(xs, a1, a2, offs), 0)
        y = torch.baddbmm(y, weight.to(x.dtype).unsqueeze(1), _unpermute(o, order, T, k))
    return y.view(T, x.shape[1])
