"""The dispatch plan, the torch reference: routing (topk_ids, topk_weights) -> per-problem row
lists (docs/design.md §3). grove_kernels/triton/plan.py builds the same Plan on the device; the op layer
(ops.py) picks one, and every backend receives the result. A training forward returns the
plan's tensors (Plan.named_tensors()) with what it saved, so the backward never rebuilds it.


Problems are the E experts followed by the G = E // S adjugate experts. A *row* is one
(token, problem) pair that a GEMM computes. The rows live in two *sections*, experts then
adjugates, with static bases,
so every buffer has a fixed size and nothing is read back to the host:

    expert section    rows [0, T*k)            sorted by expert; the slots of skipped ids
                                                (expert_map -> -1) sort to its tail
    adjugate section  rows [T*k, T*k + T*ka)   ka = min(k, G); one row per distinct
                                                (token, group), weight λ·Σ w of its slots

    topk_ids [T, k] --(expert_map)--> local ids --sort--> expert rows, expert_offsets [E+1]
                    --(// S, merge duplicates per token)--> adjugate rows, adjugate_offsets [G+1]
    token_rows [T, c] / token_weight [T, c] / token_mask [T, c]: each token's rows, c = k (+ k),
        used by the combine (y_t = Σ_j token_weight · out[token_rows]) and by dX / d topk_weights.

Offsets are relative to the start of their section. Rows past a section's last offset are
padding: an in-bounds token and weight 0; kernels never compute them.
Sorting is stable and the per-token sums run in slot order, so the plan (and every reduction
built on it) is deterministic.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .routing import slots


@dataclass
class Plan:
    num_tokens: int  # T
    top_k: int  # k
    num_experts: int  # E (local experts: those with weights on this rank)
    num_groups: int  # G, 0 when the call has no adjugates
    row_token: torch.Tensor  # [R] int64: token of each row (expert section, then adjugate)
    row_weight: torch.Tensor  # [R] fp32 (fp64 for fp64 weights): w_tk or λ·Σ w; 0 on padding
    expert_offsets: torch.Tensor  # [E+1] int64: rows of expert e are [off[e], off[e+1])
    adjugate_offsets: Optional[torch.Tensor]  # [G+1] int64, relative to the adjugate section
    token_rows: torch.Tensor  # [T, c] int64: row index (expert section first, then adjugate)
    token_weight: torch.Tensor  # [T, c] fp32: the row weight seen by that token (0 if masked)
    token_mask: torch.Tensor  # [T, c] bool: entry is a real row
    group_match: Optional[torch.Tensor]  # [T, k, k] bool: slots j and m select the same group

    layout = "sections"
    _FIELDS = ("row_token", "row_weight", "expert_offsets", "token_rows", "token_weight",
               "token_mask")
    _GROVE_FIELDS = ("adjugate_offsets", "group_match")

    @classmethod
    def empty(cls, T, k, E, G, weight_dtype, device):
        """A plan of uninitialised tensors with the fixed shapes of (T, k, E, G); weight_dtype:
        that of the row weights (fp32, or fp64 for fp64 routing weights)."""
        ka, C = min(k, G), (2 * k if G else k)
        new = dict(dtype=torch.int64, device=device)
        return cls(
            num_tokens=T, top_k=k, num_experts=E, num_groups=G,
            row_token=torch.empty(T * (k + ka), **new),
            row_weight=torch.empty(T * (k + ka), dtype=weight_dtype, device=device),
            expert_offsets=torch.empty(E + 1, **new),
            adjugate_offsets=torch.empty(G + 1, **new) if G else None,
            token_rows=torch.empty(T, C, **new),
            token_weight=torch.empty(T, C, dtype=weight_dtype, device=device),
            token_mask=torch.empty(T, C, dtype=torch.bool, device=device),
            group_match=torch.empty(T, k, k, dtype=torch.bool, device=device) if G else None,
        )

    @classmethod
    def field_names(cls, grove):
        """The names of the plan's tensors (a call with adjugates has two more)."""
        return cls._FIELDS + (cls._GROVE_FIELDS if grove else ())

    def named_tensors(self):
        """{name: tensor} of the plan's tensors (from_named inverts it)."""
        return {n: getattr(self, n) for n in self.field_names(self.num_groups > 0)}

    @classmethod
    def from_named(cls, T, k, E, G, tensors):
        fields = {n: tensors[n] for n in cls.field_names(G > 0)}
        fields.setdefault("adjugate_offsets", None)
        fields.setdefault("group_match", None)
        return cls(num_tokens=T, top_k=k, num_experts=E, num_groups=G, **fields)

    def __post_init__(self):
        # Derived sizes and section views are plain attributes: reading one is no call into
        # this module (every stage reads them). Views, so a plan filled in place sees them.
        self.num_expert_rows = self.num_tokens * self.top_k  # R_e = T*k
        self.num_rows = self.row_token.shape[0]  # R = R_e + R_a
        self.num_adjugate_rows = self.num_rows - self.num_expert_rows  # R_a = T*ka
        Re, grove = self.num_expert_rows, self.num_groups > 0
        self.expert_token = self.row_token[:Re]
        self.expert_weight = self.row_weight[:Re]
        self.adjugate_token = self.row_token[Re:] if grove else None
        self.adjugate_weight = self.row_weight[Re:] if grove else None
        # The unified-GEMM view (start [E+G], count [E+G] int64, absolute rows); a plan filled
        # in place after construction is rebuilt (dataclasses.replace) to refresh it.
        self.problem_start, self.problem_count = self.problem_rows()

    def topk_weight_grad(self, d_row_weight, adjugate_scale):
        """d topk_weights [T, k] from d(row weight) [R]: an expert row's weight is w_tj, an
        adjugate row's λ·Σ w over its group, so each slot of the group gets λ·d(that row)."""
        d_slot = torch.where(self.token_mask, d_row_weight[self.token_rows], 0.0)
        k = self.top_k
        d_topk = d_slot[:, :k]
        if self.num_groups:
            d_topk = d_topk + adjugate_scale * (
                self.group_match.to(d_slot.dtype) @ d_slot[:, k:, None]).squeeze(-1)
        return d_topk

    def problem_rows(self):
        """(start [E+G], count [E+G]) int64, absolute row positions: the unified-GEMM view."""
        starts = [self.expert_offsets[:-1]]
        counts = [self.expert_offsets.diff()]
        if self.num_groups:
            starts.append(self.adjugate_offsets[:-1] + self.num_expert_rows)
            counts.append(self.adjugate_offsets.diff())
        return torch.cat(starts), torch.cat(counts)


def _section(keys, values, num_problems, num_rows):
    """Stable-sort candidates by problem key (key == num_problems marks a non-row).

    Returns the first `num_rows` sorted candidate indices, the offsets [P+1] and, for every
    candidate, its row position (>= num_rows for non-rows).
    """
    sorted_keys, full_order = torch.sort(keys, stable=True)
    order = full_order[:num_rows]
    bounds = torch.arange(num_problems + 1, device=keys.device, dtype=sorted_keys.dtype)
    offsets = torch.searchsorted(sorted_keys[:num_rows].contiguous(), bounds)
    position = torch.empty_like(full_order)
    position[full_order] = torch.arange(keys.numel(), device=keys.device)
    return order, offsets, values[order], position


def build_plan(topk_ids, topk_weights, num_experts, group_size=0, adjugate_scale=0.0,
               expert_map=None):
    """Build the plan on the device of topk_ids. group_size == 0 means no adjugate problems."""
    T, k = topk_ids.shape
    device = topk_ids.device
    ids, valid, w = slots(topk_ids, topk_weights, num_experts, expert_map)
    E = num_experts
    G = E // group_size if group_size else 0

    # arange // k, not repeat_interleave: the output size must not depend on a device read.
    slot_token = torch.arange(T * k, device=device) // k
    e_keys = torch.where(valid, ids, E).flatten()
    e_order, e_offsets, e_weight, e_pos = _section(e_keys, w.flatten(), E, T * k)
    row_token, row_weight = [slot_token[e_order]], [e_weight]
    token_rows = [e_pos.view(T, k)]
    token_weight = [w]
    token_mask = [valid]

    a_offsets = group_match = None
    if G:
        ka = min(k, G)
        group = torch.where(valid, ids // group_size, -1)
        group_match = (group[:, :, None] == group[:, None, :]) & valid[:, :, None]
        earlier = torch.ones(k, k, dtype=torch.bool, device=device).tril(-1)
        leader = valid & ~(group_match & earlier).any(-1)
        # Σ over slots in slot order, written out: a reduction kernel's order varies with k
        # and the device, which would change λ·Σw by an ulp between backends.
        group_w = torch.zeros_like(w)
        for m in range(k):
            group_w = group_w + torch.where(group_match[:, :, m], w[:, m, None], 0.0)
        group_w = adjugate_scale * group_w
        group_w = torch.where(leader, group_w, 0.0)
        a_keys = torch.where(leader, group, G).flatten()
        a_order, a_offsets, a_weight, a_pos = _section(a_keys, group_w.flatten(), G, T * ka)
        row_token.append(slot_token[a_order])
        row_weight.append(a_weight)
        token_rows.append(a_pos.view(T, k) + T * k)
        token_weight.append(group_w)
        token_mask.append(leader)

    mask = torch.cat(token_mask, 1)
    rows = torch.where(mask, torch.cat(token_rows, 1), 0)
    return Plan(
        num_tokens=T, top_k=k, num_experts=E, num_groups=G,
        row_token=torch.cat(row_token), row_weight=torch.cat(row_weight),
        expert_offsets=e_offsets, adjugate_offsets=a_offsets,
        token_rows=rows, token_weight=torch.cat(token_weight, 1), token_mask=mask,
        group_match=group_match,
    )

