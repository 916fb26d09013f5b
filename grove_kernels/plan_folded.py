"""The folded dispatch plan, the torch reference: routing -> expert rows that also carry the
adjugates (the `folded` adjugate layout, chosen per call by GROVE_ADJUGATE_LAYOUT; the
`sections` layout is grove_kernels/plan.py). build_folded_plan of grove_kernels/triton/plan.py
builds the same FoldedPlan on the device, tensor for tensor.

There are only expert rows, R = T*k. The *leader* of (token t, group g = e // S) is t's first
valid slot, in slot order, whose expert lies in g: its row carries the adjugate A_g(x_t) with
the weight λ·Σ_{m: group(m) = g} w_tm. Within each expert the leader rows come first:

    topk_ids [T, k] --(expert_map)--> local ids e, leader flags
        --stable sort by (e, not leader)--> rows [0, T*k):
            expert e:  [expert_offsets[e], leader_ends[e])    leader rows (slot order)
                       [leader_ends[e], expert_offsets[e+1])  other rows (slot order)
            tail:      skipped slots (expert_map -> -1, ids out of range): padding rows with
                       an in-bounds token and weights 0; kernels never compute them
    row_token, row_weight (w_tk), leader_weight (λ·Σw on leader rows, else 0)   [R]
    token_rows, token_weight, token_mask, token_leader [T, k]; group_match [T, k, k]

The adjugate problem of g is the union of the leader prefixes of its S experts: one row per
distinct (t, g). The combine sums k rows per token (y_t = Σ_j o[token_rows[t, j]], o already
holding both terms). d topk_weights[t, j] = d row_weight[row(t, j)]
+ λ·d leader_weight[row of the leader of group(j) in t] (topk_weight_grad).
Sorting is stable and λ·Σw is summed in slot order, so the plan is deterministic.
"""
from dataclasses import dataclass, field

import torch

from .routing import slots


@dataclass
class FoldedPlan:
    num_tokens: int  # T
    top_k: int  # k
    num_experts: int  # E (local experts)
    num_groups: int  # G = E // S (> 0: the folded layout is for calls with adjugates)
    row_token: torch.Tensor  # [R] int64, R = T*k
    row_weight: torch.Tensor  # [R] fp32 (fp64 for fp64 weights): w_tk; 0 on padding
    leader_weight: torch.Tensor  # [R] same dtype: λ·Σw on leader rows, 0 elsewhere
    expert_offsets: torch.Tensor  # [E+1] int64
    leader_ends: torch.Tensor  # [E] int64, absolute: leader rows of e are [off[e], ends[e])
    token_rows: torch.Tensor  # [T, k] int64 (0 where masked)
    token_weight: torch.Tensor  # [T, k]: w_tk (0 where masked)
    token_mask: torch.Tensor  # [T, k] bool: slot is a real row
    token_leader: torch.Tensor  # [T, k] bool: slot is its group's leader
    group_match: torch.Tensor  # [T, k, k] bool: slots j and m select the same group
    # Plain attributes, set once at construction: reading one in a launch wrapper is no call.
    group_size: int = field(init=False)  # S
    num_rows: int = field(init=False)  # R = T*k
    num_expert_rows: int = field(init=False)  # R (every row is an expert row)

    layout = "folded"
    _FIELDS = ("row_token", "row_weight", "leader_weight", "expert_offsets", "leader_ends",
               "token_rows", "token_weight", "token_mask", "token_leader", "group_match")

    @classmethod
    def empty(cls, T, k, E, G, weight_dtype, device):
        """A plan of uninitialised tensors with the fixed shapes of (T, k, E, G)."""
        R = T * k
        new = dict(dtype=torch.int64, device=device)
        wnew = dict(dtype=weight_dtype, device=device)
        bnew = dict(dtype=torch.bool, device=device)
        return cls(
            num_tokens=T, top_k=k, num_experts=E, num_groups=G,
            row_token=torch.empty(R, **new), row_weight=torch.empty(R, **wnew),
            leader_weight=torch.empty(R, **wnew), expert_offsets=torch.empty(E + 1, **new),
            leader_ends=torch.empty(E, **new), token_rows=torch.empty(T, k, **new),
            token_weight=torch.empty(T, k, **wnew), token_mask=torch.empty(T, k, **bnew),
            token_leader=torch.empty(T, k, **bnew), group_match=torch.empty(T, k, k, **bnew),
        )

    @classmethod
    def field_names(cls, grove=True):
        """The names of the plan's tensors."""
        return cls._FIELDS

    def named_tensors(self):
        """{name: tensor} of the plan's tensors (from_named inverts it)."""
        return {n: getattr(self, n) for n in self._FIELDS}

    @classmethod
    def from_named(cls, T, k, E, G, tensors):
        return cls(num_tokens=T, top_k=k, num_experts=E, num_groups=G,
                   **{n: tensors[n] for n in cls._FIELDS})

    def __post_init__(self):
        self.group_size = self.num_experts // self.num_groups
        self.num_rows = self.num_expert_rows = self.row_token.shape[0]

    def topk_weight_grad(self, d_row_weight, d_leader_weight, adjugate_scale):
        """d topk_weights [T, k] from d row_weight [R] and d leader_weight [R] (the gradient
        w.r.t. the λ-scaled leader weight): each slot of a group gets λ·d of its leader row."""
        d_slot = torch.where(self.token_mask, d_row_weight[self.token_rows], 0.0)
        d_lead = torch.where(self.token_leader, d_leader_weight[self.token_rows], 0.0)
        # One leader per matched set: the product picks it, exactly.
        shared = (self.group_match.to(d_lead.dtype) @ d_lead[:, :, None]).squeeze(-1)
        return d_slot + adjugate_scale * shared


def leaders(ids, valid, w, group_size, adjugate_scale):
    """(group_match [T, k, k], leader [T, k], λ·Σw on leader slots else 0 [T, k]) from local
    ids and validity; the sum runs in slot order, one term a step (every backend's order)."""
    k = ids.shape[1]
    group = torch.where(valid, ids // group_size, -1)
    group_match = (group[:, :, None] == group[:, None, :]) & valid[:, :, None]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    leader = valid & ~(group_match & earlier).any(-1)
    group_w = torch.zeros_like(w)
    for m in range(k):
        group_w = group_w + torch.where(group_match[:, :, m], w[:, m, None], 0.0)
    return group_match, leader, torch.where(leader, adjugate_scale * group_w, 0.0)


def build_folded_plan(topk_ids, topk_weights, num_experts, group_size, adjugate_scale=0.0,
                      expert_map=None):
    """Build the folded plan on the device of topk_ids (group_size >= 1)."""
    T, k = topk_ids.shape
    device = topk_ids.device
    E, S = num_experts, group_size
    G = E // S
    ids, valid, w = slots(topk_ids, topk_weights, E, expert_map)
    group_match, leader, lead_w = leaders(ids, valid, w, S, adjugate_scale)

    # key 2e: leader rows of e; 2e + 1: its other rows; 2E: skipped slots (the tail).
    keys = torch.where(valid, 2 * ids + (~leader).long(), 2 * E).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys.contiguous(),
                                torch.arange(2 * E + 1, device=device, dtype=keys.dtype))
    position = torch.empty_like(order)
    position[order] = torch.arange(T * k, device=device)
    slot_token = torch.arange(T * k, device=device) // k  # no device read for the size
    return FoldedPlan(
        num_tokens=T, top_k=k, num_experts=E, num_groups=G,
        row_token=slot_token[order], row_weight=w.flatten()[order],
        leader_weight=lead_w.flatten()[order],
        expert_offsets=bounds[0::2].contiguous(), leader_ends=bounds[1::2].contiguous(),
        token_rows=torch.where(valid, position.view(T, k), 0), token_weight=w,
        token_mask=valid, token_leader=leader, group_match=group_match,
    )
