"""Grove routing, the torch reference (docs/design.md §1): router logits -> (weights, ids).

    router_logits [T, E], selection_bias [E] or None
      p      = softmax(l)                      fp32 (fp64 for fp64 logits)
      score  = l, or sigmoid(l) + b with a bias
      ids    = the k best by (score, then l, then the lower id); NaN ranks as -inf
                                                -> int32 [T, k], best first
      w      = p[ids], / Σ_k w when renormalizing -> [T, k], fp64 for fp64 logits, else fp32

The ranking rule (README "Routing semantics") is the one the Triton kernel follows, so every
backend selects the same experts: ties are common (a zero-initialised router, bf16 logits,
sigmoid(l) rounding to 1.0 for l >~ 17 in fp32), and an order left to torch.topk differs from
an argmax loop's. A NaN logit leaves its own token's weights NaN (softmax) and its ids in range.

`slots` is where both plans (plan.py, plan_folded.py) start from the routing: ids mapped to
local experts (expert_map), the valid slots, and their weights in the accumulation dtype.
"""
import functools

import torch

# The accumulation dtype of a float dtype, and so that of routing and row weights: fp32, or
# fp64 for fp64 (the float64 runs stay exact: gradcheck). The one such helper of the package;
# a partial of a C function, so calling it enters no Python frame of another layer.
acc_dtype = functools.partial(torch.promote_types, type2=torch.float32)


def _rank_key(t):
    # NaN would sort above +inf (and poison an argmax); as -inf it loses to every number and
    # an all-NaN token still gets k distinct, in-range ids: 0..k-1.
    return torch.where(torch.isnan(t), float("-inf"), t)


def rank(logits, scores):
    """Expert ids [T, E] ordered best first by (score, logit, lower id), NaN as -inf."""
    # Stable sorts from the last key to the first: equal keys keep the previous order, and the
    # initial order is the id order.
    order = torch.sort(_rank_key(logits), dim=-1, descending=True, stable=True).indices
    if scores is not logits:
        by_score = torch.sort(_rank_key(scores).gather(1, order), dim=-1, descending=True,
                              stable=True).indices
        order = order.gather(1, by_score)
    return order


def topk(router_logits, top_k, renormalize, selection_bias):
    logits = router_logits.to(acc_dtype(router_logits.dtype))
    if selection_bias is None:
        # sigmoid is monotone: ranking the logits themselves avoids its saturation ties.
        scores = logits
    else:
        scores = torch.sigmoid(logits) + selection_bias.to(logits.dtype)
    ids = rank(logits, scores)[:, :top_k]
    weights = torch.softmax(logits, dim=-1).gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(acc_dtype(router_logits.dtype)), ids.to(torch.int32)


def slots(topk_ids, topk_weights, num_experts, expert_map=None):
    """(ids [T, k] int64 local expert ids, valid [T, k], w [T, k] in the accumulation dtype, 0
    on skipped slots) of both layouts' plans."""
    ids = topk_ids.long()
    if expert_map is not None:
        # Out-of-range ids (value checks switched off) become skipped slots, never OOB reads.
        n = expert_map.shape[0]
        ids = torch.where((ids >= 0) & (ids < n), expert_map.long()[ids.clamp(0, n - 1)], -1)
    valid = (ids >= 0) & (ids < num_experts)
    w = torch.where(valid, topk_weights.to(acc_dtype(topk_weights.dtype)), 0.0)
    return ids, valid, w
