"""Grove routing in one Triton kernel: router logits -> (weights, ids), the semantics of
grove_kernels/routing.py (docs/design.md §1; its ranking rule, README "Routing semantics").

    router_logits [T, E] (fp32 | fp16 | bf16 | fp64), selection_bias [E] or None
      _topk_softmax_kernel   cdiv(T, BT) programs, each BT tokens x EP (E padded to a power
                             of two) logits in registers
        p      = softmax(l)                          fp32 (fp64 for fp64 logits)
        score  = l, or sigmoid(l) + b with a bias
        ids    = k rounds of argmax over the experts not yet taken, by (score, then l, then
                 the lower id), NaN ranking as -inf: best first, as routing.rank orders them
        w      = p[ids], / Σ_k w when renormalizing
      -> weights [T, k] (fp64 for fp64 logits, else fp32), ids int32 [T, k]
"""
import torch
import triton
import triton.language as tl

from ..routing import acc_dtype

# Logits per program: enough to fill a block of warps with few tokens when E is large.
_BLOCK_LOGITS = 2048


@triton.jit
def _topk_softmax_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, stride_t, stride_e,
                         K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                         BT: tl.constexpr, HAS_BIAS: tl.constexpr,
                         RENORMALIZE: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)[:, None]
    e = tl.arange(0, EP)[None, :]
    expert = e < E
    # Rows past T load zeros (not -inf) so that their softmax stays finite; they are not stored.
    # Converting right after the load keeps bf16 out of arithmetic (wrong under the interpreter).
    x = tl.load(logits_ptr + t.to(tl.int64) * stride_t + e.to(tl.int64) * stride_e,
                mask=(t < T) & expert, other=0.0).to(ACC)
    x = tl.where(expert, x, float("-inf"))

    ex = tl.exp(x - tl.max(x, 1)[:, None])
    p = ex / tl.sum(ex, 1)[:, None]
    # NaN as -inf in the ranking: a NaN never equals the max, so it would leave no expert to
    # pick (an id of EP), and the token's ids must stay in range whatever its values.
    rank_l = tl.where(x != x, float("-inf"), x)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=expert, other=0.0).to(ACC)
        score = 1.0 / (1.0 + tl.exp(-x)) + bias
        score = tl.where(expert & (score == score), score, float("-inf"))
    else:
        # sigmoid is monotone: ranking the logits avoids its ties where it saturates.
        score = rank_l

    # Padding experts start out taken; an explicit mask (not a -inf score) keeps the choice
    # among real experts even when their scores are -inf themselves.
    taken = (e >= E) | (t < 0)
    slot = tl.arange(0, KP)[None, :]
    w = tl.zeros([BT, KP], ACC)
    ids = tl.zeros([BT, KP], tl.int32)
    for i in tl.static_range(K):
        best = tl.max(tl.where(taken, float("-inf"), score), 1)
        tie = ~taken & (score == best[:, None])
        if HAS_BIAS:
            # Among equal scores (sigmoid saturating to 1.0) the larger logit wins.
            best_l = tl.max(tl.where(tie, rank_l, float("-inf")), 1)
            tie = tie & (rank_l == best_l[:, None])
        pick = tl.min(tl.where(tie, e, EP), 1)
        chosen = e == pick[:, None]
        w = tl.where(slot == i, tl.sum(tl.where(chosen, p, 0.0), 1)[:, None], w)
        ids = tl.where(slot == i, pick[:, None], ids)
        taken = taken | chosen
    if RENORMALIZE:
        w = w / tl.sum(w, 1)[:, None]

    out = (t < T) & (slot < K)
    tl.store(weights_ptr + t * K + slot, w.to(weights_ptr.dtype.element_ty), mask=out)
    tl.store(ids_ptr + t * K + slot, ids, mask=out)


def topk(router_logits, top_k, renormalize, selection_bias):
    """(weights [T, k], ids int32 [T, k]) on the device of router_logits, no host sync; the
    weights are fp64 for fp64 logits, else fp32."""
    T, E = router_logits.shape
    k = int(top_k)
    weights = torch.empty(T, k, dtype=acc_dtype(router_logits.dtype),
                          device=router_logits.device)
    ids = torch.empty(T, k, dtype=torch.int32, device=router_logits.device)
    if T == 0 or k == 0:
        return weights, ids
    acc = tl.float64 if router_logits.dtype == torch.float64 else tl.float32
    EP = triton.next_power_of_2(E)
    BT = max(1, min(64, _BLOCK_LOGITS // EP))
    bias = selection_bias.contiguous() if selection_bias is not None else router_logits
    _topk_softmax_kernel[(triton.cdiv(T, BT),)](
        router_logits, bias, weights, ids, T, E,
        router_logits.stride(0), router_logits.stride(1),
        K=k, KP=triton.next_power_of_2(k), EP=EP, BT=BT,
        HAS_BIAS=selection_bias is not None, RENORMALIZE=bool(renormalize), ACC=acc)
    return weights, ids
