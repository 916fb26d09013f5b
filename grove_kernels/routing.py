"""Grove routing, the torch reference (DESIGN §1): router logits -> (weights, ids).

    router_logits [T, E], selection_bias [E] or None
      p      = softmax(l)                      fp32 (fp64 for fp64 logits)
      score  = l, or sigmoid(l) + b with a bias
      ids    = the k best scores                -> int32 [T, k]
      w      = p[ids], / Σ_k w when renormalizing -> fp32 [T, k]
"""
import torch


def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)


def topk(router_logits, top_k, renormalize, selection_bias):
    logits = router_logits.to(_acc(router_logits.dtype))
    if selection_bias is None:
        # sigmoid is monotone: ranking the logits themselves avoids its saturation ties.
        scores = logits
    else:
        scores = torch.sigmoid(logits) + selection_bias.to(logits.dtype)
    ids = torch.topk(scores, top_k, dim=-1).indices
    weights = torch.softmax(logits, dim=-1).gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.float(), ids.to(torch.int32)
