"""The folded dispatch plan in Triton: the same FoldedPlan as
grove_kernels.plan_folded.build_folded_plan, tensor for tensor (torch.equal), in four launches
with fixed-size outputs and no host sync (CUDA-graph capturable). It shares the scan and the
in-block rank with plan.py (the sections plan).

Slots s = t*k + j in NB = cdiv(T*k, B) blocks of B slots. One sort key per slot, P = 2E + 1
histogram columns: 2e for a leader slot of expert e, 2e + 1 for its other slots, 2E for a
skipped slot (the tail).

    topk_ids, topk_weights [T, k], expert_map [n]
      _folded_slots_kernel   NB programs: local ids, validity; each slot against its token's
                             k slots ([B, KP] tile): group match, leader, λ·Σw in slot order
                             -> token_weight, token_mask, token_leader [T, k],
                                group_match [T, k, k], leader weight per slot [T*k],
                                keys [T*k], counts [NB, P]
      _plan_scan_kernel      (plan.py) counts -> exclusive prefix over blocks, totals [P]
      _folded_offsets_kernel 1 program: totals -> key starts [P], expert_offsets [E+1]
                             (starts of the even keys), leader_ends [E] (of the odd keys)
      _folded_scatter_kernel NB programs: row = key start + block prefix + rank in block
                             -> row_token, row_weight, leader_weight [R], token_rows [T, k]

Rows of one key come out in slot order, the torch plan's stable sort.
"""
import torch
import triton
import triton.language as tl

from ..routing import acc_dtype
from ..plan_folded import FoldedPlan
from .plan import (_BLOCK_SLOTS, _SCAN_COLS, _SCAN_ROWS, _SCATTER_WARPS, _fp32_parts,
                   _group_leaders, _local_ids, _plan_scan_kernel, _rank_in_block)


@triton.jit
def _folded_slots_kernel(ids_ptr, w_ptr, map_ptr, token_weight_ptr, token_mask_ptr,
                         token_leader_ptr, group_match_ptr, lead_w_ptr, keys_ptr, counts_ptr,
                         num_slots, map_len, E, S, P, lam_hi, lam_mid, lam_lo,
                         K: tl.constexpr, KP: tl.constexpr, B: tl.constexpr,
                         BINS: tl.constexpr, HAS_MAP: tl.constexpr, ACC: tl.constexpr):
    block = tl.program_id(0)
    slot = block.to(tl.int64) * B + tl.arange(0, B)
    real = slot < num_slots
    ids, valid = _local_ids(ids_ptr, map_ptr, slot, real, map_len, E, HAS_MAP)
    w = tl.load(w_ptr + slot, mask=valid, other=0.0).to(ACC)
    tl.store(token_weight_ptr + slot, w, mask=real)
    tl.store(token_mask_ptr + slot, valid.to(tl.uint8), mask=real)

    m, match, leader, group, lead_w = _group_leaders(
        ids_ptr, w_ptr, map_ptr, slot, real, ids, valid, map_len, E, S, lam_hi, lam_mid, lam_lo,
        K, KP, B, HAS_MAP, ACC)
    tl.store(lead_w_ptr + slot, lead_w, mask=real)
    tl.store(token_leader_ptr + slot, leader.to(tl.uint8), mask=real)
    tl.store(group_match_ptr + slot[:, None] * K + m, match.to(tl.uint8),
             mask=real[:, None] & (m < K))
    key = tl.where(valid, 2 * ids + 1 - leader.to(tl.int64), 2 * E).to(tl.int32)
    tl.store(keys_ptr + slot, key, mask=real)
    counts = tl.histogram(key, BINS, mask=real)
    col = tl.arange(0, BINS)
    tl.store(counts_ptr + block.to(tl.int64) * P + col, counts, mask=col < P)


@triton.jit
def _folded_offsets_kernel(totals_ptr, starts_ptr, expert_offsets_ptr, leader_ends_ptr, P,
                           PP: tl.constexpr):
    col = tl.arange(0, PP)
    inside = col < P
    total = tl.load(totals_ptr + col, mask=inside, other=0)
    start = tl.cumsum(total, 0) - total
    even = (col % 2) == 0
    tl.store(expert_offsets_ptr + col // 2, start.to(tl.int64), mask=inside & even)
    tl.store(leader_ends_ptr + col // 2, start.to(tl.int64), mask=inside & ~even)
    tl.store(starts_ptr + col, start, mask=inside)


@triton.jit
def _folded_scatter_kernel(keys_ptr, token_weight_ptr, token_mask_ptr, lead_w_ptr, counts_ptr,
                           starts_ptr, row_token_ptr, row_weight_ptr, leader_weight_ptr,
                           token_rows_ptr, num_slots, P, K: tl.constexpr, B: tl.constexpr):
    block = tl.program_id(0)
    slot = block.to(tl.int64) * B + tl.arange(0, B)
    real = slot < num_slots
    key = tl.load(keys_ptr + slot, mask=real, other=0)
    row = (tl.load(starts_ptr + key, mask=real, other=0)
           + tl.load(counts_ptr + block.to(tl.int64) * P + key, mask=real, other=0)
           + _rank_in_block(key, real, B)).to(tl.int64)
    tl.store(row_token_ptr + row, slot // K, mask=real)
    tl.store(row_weight_ptr + row, tl.load(token_weight_ptr + slot, mask=real), mask=real)
    tl.store(leader_weight_ptr + row, tl.load(lead_w_ptr + slot, mask=real), mask=real)
    valid = tl.load(token_mask_ptr + slot, mask=real, other=0) != 0
    tl.store(token_rows_ptr + slot, tl.where(valid, row, 0), mask=real)


def build_folded_plan(topk_ids, topk_weights, num_experts, group_size, adjugate_scale=0.0,
                      expert_map=None):
    """grove_kernels.plan_folded.build_folded_plan on the device of topk_ids."""
    T, k = topk_ids.shape
    device = topk_ids.device
    E, S = num_experts, group_size
    acc = acc_dtype(topk_weights.dtype)
    plan = FoldedPlan.empty(T, k, E, E // S, acc, device)
    if T * k == 0:
        plan.expert_offsets.zero_()
        plan.leader_ends.zero_()
        return plan
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    has_map = expert_map is not None
    emap = expert_map.contiguous() if has_map else ids
    KP = max(2, triton.next_power_of_2(k))  # a [B, 1] tile trips Triton 3.6 on sm_90
    NB = triton.cdiv(T * k, _BLOCK_SLOTS)
    P = 2 * E + 1
    counts = torch.empty(NB, P, dtype=torch.int32, device=device)
    totals = torch.empty(2, P, dtype=torch.int32, device=device)  # totals, key starts
    keys = torch.empty(T * k, dtype=torch.int32, device=device)
    lead_w = torch.empty(T * k, dtype=acc, device=device)
    as_bytes = lambda t: t.view(torch.uint8)  # noqa: E731  (bool outputs written as bytes)
    _folded_slots_kernel[(NB,)](
        ids, weights, emap, plan.token_weight, as_bytes(plan.token_mask),
        as_bytes(plan.token_leader), as_bytes(plan.group_match), lead_w, keys, counts,
        T * k, emap.shape[0], E, S, P, *_fp32_parts(float(adjugate_scale)),
        K=k, KP=KP, B=_BLOCK_SLOTS, BINS=triton.next_power_of_2(P), HAS_MAP=has_map,
        ACC=tl.float64 if acc == torch.float64 else tl.float32)
    _plan_scan_kernel[(triton.cdiv(P, _SCAN_COLS),)](counts, totals, NB, P, RB=_SCAN_ROWS,
                                                     PB=_SCAN_COLS)
    _folded_offsets_kernel[(1,)](totals, totals[1], plan.expert_offsets, plan.leader_ends, P,
                                 PP=triton.next_power_of_2(P))
    _folded_scatter_kernel[(NB,)](
        keys, plan.token_weight, as_bytes(plan.token_mask), lead_w, counts, totals[1],
        plan.row_token, plan.row_weight, plan.leader_weight, plan.token_rows, T * k, P, K=k,
        B=_BLOCK_SLOTS, num_warps=_SCATTER_WARPS)
    return plan
