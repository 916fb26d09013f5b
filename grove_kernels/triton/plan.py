"""The dispatch plan in Triton: the same Plan as grove_kernels.plan.build_plan, tensor for
tensor (torch.equal), built on the device in four launches with fixed-size outputs and no
host sync, so it can be captured in a CUDA graph.

Slots s = t*k + j are processed in NB = cdiv(T*k, B) blocks of B consecutive slots. Each slot
has two sort keys: expert key in [0, E] (E: skipped slot, sorts to the tail of the expert
section) and adjugate key in [0, G] (G: not its group's leader in the token), counted as
P = (E+1) + (G+1) histogram columns, expert keys first.

    topk_ids, topk_weights [T, k], expert_map [n]
      _plan_slots_kernel    NB programs: local ids, validity; each slot against its token's
                            k slots ([B, KP] tile, KP = k padded to a power of two): group
                            match, leader, λ·Σw in slot order
                            -> token_weight, token_mask [T, c], group_match [T, k, k],
                               keys [2, T*k], counts [NB, P] (per-block histogram)
      _plan_scan_kernel     cdiv(P, PB) programs: counts -> exclusive prefix over blocks
                            (in place), totals [P]
      _plan_offsets_kernel  1 program: totals -> section starts [P] (exclusive prefix over
                            the keys of a section), expert_offsets [E+1], adjugate_offsets [G+1]
      _plan_scatter_kernel  NB programs: row = section start + block prefix of the key
                            + rank among equal keys earlier in the block ([B, B] comparison)
                            -> row_token, row_weight [R], token_rows [T, c]

Rows of one key come out ordered by (block, rank in block), i.e. by slot index t*k + j: the
stable order of the torch plan. The adjugate section keeps only its first T*ka candidates,
leaders then non-leaders in slot order, exactly the torch plan's truncated stable sort.

The folded plan (build_folded_plan; grove_kernels.plan_folded.build_folded_plan, tensor for
tensor) runs the same four steps with one sort key per slot, P = 2E + 1 histogram columns: 2e
for a leader slot of expert e, 2e + 1 for its other slots, 2E for a skipped slot (the tail).

    topk_ids, topk_weights [T, k], expert_map [n]
      _folded_slots_kernel   NB programs: local ids, validity; each slot against its token's
                             k slots ([B, KP] tile): group match, leader, λ·Σw in slot order
                             -> token_weight, token_mask, token_leader [T, k],
                                group_match [T, k, k], leader weight per slot [T*k],
                                keys [T*k], counts [NB, P]
      _plan_scan_kernel      counts -> exclusive prefix over blocks, totals [P]
      _folded_offsets_kernel 1 program: totals -> key starts [P], expert_offsets [E+1]
                             (starts of the even keys), leader_ends [E] (of the odd keys)
      _folded_scatter_kernel NB programs: row = key start + block prefix + rank in block
                             -> row_token, row_weight, leader_weight [R], token_rows [T, k]
"""
import dataclasses
import struct

import torch
import triton
import triton.language as tl

from ..plan import Plan
from ..plan_folded import FoldedPlan
from ..routing import acc_dtype

# Slots per block: the scatter's rank is a [B, B] comparison, so B bounds its registers.
# B = 64 with 2 scatter warps was the fastest on an H100 (E=128, k=8, T = 64 ... 16384:
# 14-51 us a plan; B = 128 or 256 and 4 or 8 warps were up to 2.5x slower at small T).
_BLOCK_SLOTS = 64
_SCATTER_WARPS = 2
# Scan tile: histogram columns per program, blocks per step. Narrow column strips give the
# sequential scan over blocks more programs (H100, T = 16384: 41 us a plan vs 49 with 16).
_SCAN_COLS = 4
_SCAN_ROWS = 256


@triton.jit
def _local_ids(ids_ptr, map_ptr, slot, real, map_len, E, HAS_MAP: tl.constexpr):
    ids = tl.load(ids_ptr + slot, mask=real, other=-1).to(tl.int64)
    if HAS_MAP:
        # Out-of-range ids (value checks switched off) become skipped slots, never OOB reads.
        inside = (ids >= 0) & (ids < map_len)
        ids = tl.load(map_ptr + ids, mask=real & inside, other=-1).to(tl.int64)
    return ids, real & (ids >= 0) & (ids < E)


@triton.jit
def _group_leaders(ids_ptr, w_ptr, map_ptr, slot, real, ids, valid, map_len, E, S, lam_hi,
                   lam_mid, lam_lo, K: tl.constexpr, KP: tl.constexpr, B: tl.constexpr,
                   HAS_MAP: tl.constexpr, ACC: tl.constexpr):
    """Per slot of a block: (m [1, KP], group match [B, KP] with its token's slots, leader [B],
    group [B], λ·Σw of its group on leaders else 0 [B]); both layouts' plans share it."""
    # Each slot re-reads its token's k slots (cached loads) as a [B, KP] tile: a block need not
    # hold whole tokens, and no tile needs a reshape.
    j = (slot % K)[:, None]
    m = tl.arange(0, KP)[None, :]
    sibling = slot[:, None] - j + m
    sib_ids, sib_valid = _local_ids(ids_ptr, map_ptr, sibling, real[:, None] & (m < K),
                                    map_len, E, HAS_MAP)
    sib_w = tl.load(w_ptr + sibling, mask=sib_valid, other=0.0).to(ACC)
    group = tl.where(valid, ids // S, -1)
    match = (tl.where(sib_valid, sib_ids // S, -1) == group[:, None]) & valid[:, None]
    leader = valid & (tl.sum((match & (m < j)).to(tl.int32), 1) == 0)
    # Σ in slot order, one term per step (a sum of one term and zeros is exact): the same bits
    # on every device and for every block shape.
    total = tl.zeros([B], ACC)
    for i in tl.static_range(K):
        total += tl.sum(tl.where(match & (m == i), sib_w, 0.0), 1)
    if ACC == tl.float64:
        # Float arguments reach compiled kernels as fp32: λ comes in three exact parts.
        lam = (tl.full([], lam_hi, tl.float64) + tl.full([], lam_mid, tl.float64)
               + tl.full([], lam_lo, tl.float64))
    else:
        lam = tl.full([], lam_hi, tl.float32)
    return m, match, leader, group, tl.where(leader, lam * total, 0.0)


@triton.jit
def _slot_block(ids_ptr, w_ptr, map_ptr, num_slots, map_len, E, B: tl.constexpr,
                HAS_MAP: tl.constexpr, ACC: tl.constexpr):
    """(slot [B] int64, real, local ids, valid, weights in ACC, 0 where not valid) of this
    program's block of slots: the start of both layouts' slot kernels."""
    slot = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    real = slot < num_slots
    ids, valid = _local_ids(ids_ptr, map_ptr, slot, real, map_len, E, HAS_MAP)
    return slot, real, ids, valid, tl.load(w_ptr + slot, mask=valid, other=0.0).to(ACC)


@triton.jit
def _plan_slots_kernel(ids_ptr, w_ptr, map_ptr, token_weight_ptr, token_mask_ptr,
                       group_match_ptr, keys_ptr, counts_ptr, num_slots, map_len, E, S, G, P,
                       lam_hi, lam_mid, lam_lo,
                       K: tl.constexpr, KP: tl.constexpr, B: tl.constexpr, BINS: tl.constexpr,
                       HAS_MAP: tl.constexpr, HAS_GROUPS: tl.constexpr, ACC: tl.constexpr):
    slot, real, ids, valid, w = _slot_block(ids_ptr, w_ptr, map_ptr, num_slots, map_len, E, B,
                                            HAS_MAP, ACC)
    e_key = tl.where(valid, ids, E).to(tl.int32)
    C: tl.constexpr = 2 * K if HAS_GROUPS else K
    entry = slot // K * C + slot % K
    tl.store(token_weight_ptr + entry, w, mask=real)
    tl.store(token_mask_ptr + entry, valid.to(tl.uint8), mask=real)
    tl.store(keys_ptr + slot, e_key, mask=real)
    counts = tl.histogram(e_key, BINS, mask=real)

    if HAS_GROUPS:
        m, match, leader, group, lead_w = _group_leaders(
            ids_ptr, w_ptr, map_ptr, slot, real, ids, valid, map_len, E, S, lam_hi, lam_mid,
            lam_lo, K, KP, B, HAS_MAP, ACC)
        a_key = tl.where(leader, group, G).to(tl.int32)
        tl.store(token_weight_ptr + entry + K, lead_w, mask=real)
        tl.store(token_mask_ptr + entry + K, leader.to(tl.uint8), mask=real)
        tl.store(group_match_ptr + slot[:, None] * K + m, match.to(tl.uint8),
                 mask=real[:, None] & (m < K))
        tl.store(keys_ptr + num_slots + slot, a_key, mask=real)
        counts += tl.histogram(a_key + E + 1, BINS, mask=real)
    col = tl.arange(0, BINS)
    tl.store(counts_ptr + tl.program_id(0).to(tl.int64) * P + col, counts, mask=col < P)


@triton.jit
def _plan_scan_kernel(counts_ptr, totals_ptr, NB, P, RB: tl.constexpr, PB: tl.constexpr):
    cols = tl.program_id(0) * PB + tl.arange(0, PB)
    col = cols[None, :]
    carry = tl.zeros([PB], tl.int32)
    for r0 in range(0, NB, RB):
        row = r0 + tl.arange(0, RB)[:, None]
        inside = (row < NB) & (col < P)
        ptrs = counts_ptr + row.to(tl.int64) * P + col
        x = tl.load(ptrs, mask=inside, other=0)
        tl.store(ptrs, tl.cumsum(x, 0) - x + carry[None, :], mask=inside)
        carry += tl.sum(x, 0)
    tl.store(totals_ptr + cols, carry, mask=cols < P)


@triton.jit
def _plan_offsets_kernel(totals_ptr, starts_ptr, expert_offsets_ptr, adjugate_offsets_ptr, E,
                         P, PP: tl.constexpr, HAS_GROUPS: tl.constexpr):
    col = tl.arange(0, PP)
    total = tl.load(totals_ptr + col, mask=col < P, other=0)
    start = tl.cumsum(total, 0) - total
    expert = col <= E
    tl.store(expert_offsets_ptr + col, start.to(tl.int64), mask=expert)
    if HAS_GROUPS:
        # The adjugate section restarts at 0 after the E + 1 expert columns.
        start -= tl.sum(tl.where(expert, total, 0), 0) * (~expert).to(tl.int32)
        adjugate = ~expert & (col < P)
        tl.store(adjugate_offsets_ptr + col - (E + 1), start.to(tl.int64), mask=adjugate)
    tl.store(starts_ptr + col, start, mask=col < P)


@triton.jit
def _rank_in_block(key, real, B: tl.constexpr):
    """Slots of the block with the same key and a smaller slot index, per slot."""
    key = tl.where(real, key, -1)
    i = tl.arange(0, B)
    same = (key[:, None] == key[None, :]) & (i[None, :] < i[:, None])
    return tl.sum(same.to(tl.int32), 1)


@triton.jit
def _plan_scatter_kernel(keys_ptr, token_weight_ptr, token_mask_ptr, counts_ptr, starts_ptr,
                         row_token_ptr, row_weight_ptr, token_rows_ptr, num_slots, E, P,
                         adjugate_rows, K: tl.constexpr, B: tl.constexpr,
                         HAS_GROUPS: tl.constexpr):
    block = tl.program_id(0)
    slot = block.to(tl.int64) * B + tl.arange(0, B)
    real = slot < num_slots
    C: tl.constexpr = 2 * K if HAS_GROUPS else K
    token = slot // K
    entry = token * C + slot % K
    block_base = counts_ptr + block.to(tl.int64) * P

    # Expert section: every slot is a row (skipped ones in the tail), rows [0, T*k).
    key = tl.load(keys_ptr + slot, mask=real, other=0)
    row = (tl.load(starts_ptr + key, mask=real, other=0)
           + tl.load(block_base + key, mask=real, other=0)
           + _rank_in_block(key, real, B)).to(tl.int64)
    tl.store(row_token_ptr + row, token, mask=real)
    tl.store(row_weight_ptr + row, tl.load(token_weight_ptr + entry, mask=real), mask=real)
    valid = tl.load(token_mask_ptr + entry, mask=real, other=0) != 0
    tl.store(token_rows_ptr + entry, tl.where(valid, row, 0), mask=real)

    if HAS_GROUPS:
        # Adjugate section: candidates past its T*ka rows are dropped (only non-leaders).
        key = tl.load(keys_ptr + num_slots + slot, mask=real, other=0) + E + 1
        row = (tl.load(starts_ptr + key, mask=real, other=0)
               + tl.load(block_base + key, mask=real, other=0)
               + _rank_in_block(key, real, B)).to(tl.int64)
        kept = real & (row < adjugate_rows)
        row += num_slots
        tl.store(row_token_ptr + row, token, mask=kept)
        tl.store(row_weight_ptr + row, tl.load(token_weight_ptr + entry + K, mask=real),
                 mask=kept)
        leader = tl.load(token_mask_ptr + entry + K, mask=real, other=0) != 0
        tl.store(token_rows_ptr + entry + K, tl.where(leader, row, 0), mask=real)


def _fp32_parts(x):
    """Three fp32 values whose fp64 sum is the double x exactly (53 <= 3 * 24 bits)."""
    parts = []
    for _ in range(3):
        part = struct.unpack("f", struct.pack("f", x))[0]
        parts.append(part)
        x -= part
    return parts


def build_plan(topk_ids, topk_weights, num_experts, group_size=0, adjugate_scale=0.0,
               expert_map=None):
    """grove_kernels.plan.build_plan on the device of topk_ids, by the kernels above."""
    T, k = topk_ids.shape
    device = topk_ids.device
    E = num_experts
    G = E // group_size if group_size else 0
    ka = min(k, G)
    acc = acc_dtype(topk_weights.dtype)
    plan = Plan.empty(T, k, E, G, acc, device)
    row_token, row_weight, token_rows = plan.row_token, plan.row_weight, plan.token_rows
    token_weight, token_mask, group_match = plan.token_weight, plan.token_mask, plan.group_match
    expert_offsets, adjugate_offsets = plan.expert_offsets, plan.adjugate_offsets
    if T * k == 0:
        expert_offsets.zero_()
        if G:
            adjugate_offsets.zero_()
        return dataclasses.replace(plan)  # derived views from the filled tensors

    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    has_map = expert_map is not None
    emap = expert_map.contiguous() if has_map else ids
    # A [B, 1] tile (k = 1) trips Triton 3.6's layout pass on sm_90; one masked column is free.
    KP = max(2, triton.next_power_of_2(k))
    NB = triton.cdiv(T * k, _BLOCK_SLOTS)
    P = E + 1 + (G + 1 if G else 0)
    counts = torch.empty(NB, P, dtype=torch.int32, device=device)
    totals = torch.empty(2, P, dtype=torch.int32, device=device)  # totals, section starts
    keys = torch.empty(2 if G else 1, T * k, dtype=torch.int32, device=device)
    # Bool outputs are written as bytes: an i1 pointer's store width is a backend detail.
    mask_bytes = token_mask.view(torch.uint8)
    match_bytes = group_match.view(torch.uint8) if G else mask_bytes
    adjugate_out = adjugate_offsets if G else expert_offsets
    ACC = tl.float64 if acc == torch.float64 else tl.float32

    _plan_slots_kernel[(NB,)](
        ids, weights, emap, token_weight, mask_bytes, match_bytes, keys, counts,
        T * k, emap.shape[0], E, group_size, G, P, *_fp32_parts(float(adjugate_scale)),
        K=k, KP=KP, B=_BLOCK_SLOTS, BINS=triton.next_power_of_2(P), HAS_MAP=has_map,
        HAS_GROUPS=G > 0, ACC=ACC)
    _plan_scan_kernel[(triton.cdiv(P, _SCAN_COLS),)](counts, totals, NB, P, RB=_SCAN_ROWS,
                                                     PB=_SCAN_COLS)
    _plan_offsets_kernel[(1,)](totals, totals[1], expert_offsets, adjugate_out, E, P,
                               PP=triton.next_power_of_2(P), HAS_GROUPS=G > 0)
    _plan_scatter_kernel[(NB,)](
        keys, token_weight, mask_bytes, counts, totals[1], row_token, row_weight, token_rows,
        T * k, E, P, T * ka, K=k, B=_BLOCK_SLOTS, HAS_GROUPS=G > 0, num_warps=_SCATTER_WARPS)
    return dataclasses.replace(plan)  # derived views from the filled tensors


# ---- the folded layout ------------------------------------------------------------------

@triton.jit
def _folded_slots_kernel(ids_ptr, w_ptr, map_ptr, token_weight_ptr, token_mask_ptr,
                         token_leader_ptr, group_match_ptr, lead_w_ptr, keys_ptr, counts_ptr,
                         num_slots, map_len, E, S, P, lam_hi, lam_mid, lam_lo,
                         K: tl.constexpr, KP: tl.constexpr, B: tl.constexpr,
                         BINS: tl.constexpr, HAS_MAP: tl.constexpr, ACC: tl.constexpr):
    slot, real, ids, valid, w = _slot_block(ids_ptr, w_ptr, map_ptr, num_slots, map_len, E, B,
                                            HAS_MAP, ACC)
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
    tl.store(counts_ptr + tl.program_id(0).to(tl.int64) * P + col, counts, mask=col < P)


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
