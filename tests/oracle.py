"""Float64 oracle of the public API, written to be read, not to be fast (docs/design.md §1, §2,
§5).

Independent of grove_kernels: plain Python loops over tokens and their selected experts, so
that the semantics can be checked line by line against the paper and vLLM. Every function
takes float64 CPU tensors and returns float64; gradients of the oracle come from
torch.autograd over these loops.

    grove_topk     logits [T, E] -> w [T, k] (softmax probabilities of the chosen experts,
                   renormalized), ids [T, k]; chosen = top-k of sigmoid(l) + bias
    grove_layer    x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia],
                   w [T, k], ids [T, k] -> y [T, H]; each group's adjugate once per token,
                   weighted by λ · Σ w over the token's experts in that group
    fused_topk     vLLM: gating [T, E] -> softmax, top-k of the probabilities, renormalize;
                   token_expert_indices[t, j] = j * T + t
    fused_experts  vLLM: y_t = Σ_j w_tj f_{e}(x_t), e = expert_map[ids_tj] (skipped if -1);
                   with apply_router_weight_on_input: y_t = Σ_j f_e(w_tj x_t)
"""
import math

import torch


def sigmoid(v):
    return 1.0 / (1.0 + torch.exp(-v))


def silu(v):
    return v * sigmoid(v)


def gelu(v):
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def softmax(v):
    e = torch.exp(v - v.max())
    return e / e.sum()


def glu_mlp(x, w_in, w_out, activation="silu"):
    """One expert on one token: x [H], w_in [2I, H] (gate rows, then up rows), w_out [H, I]."""
    inter = w_in.shape[0] // 2
    gate = w_in[:inter] @ x
    up = w_in[inter:] @ x
    act = silu(gate) if activation == "silu" else gelu(gate)
    return w_out @ (act * up)


def _top_k_indices(scores, k):
    """Indices of the k largest scores, largest first (ties: lower index first)."""
    order = sorted(range(scores.shape[0]), key=lambda e: (-float(scores[e]), e))
    return order[:k]


def grove_topk(logits, k, renormalize=True, selection_bias=None):
    T, E = logits.shape
    weights, ids = [], []
    for t in range(T):
        probs = softmax(logits[t])
        score = sigmoid(logits[t])
        if selection_bias is not None:
            score = score + selection_bias
        chosen = _top_k_indices(score.detach(), k)
        w = torch.stack([probs[e] for e in chosen])
        if renormalize:
            w = w / w.sum()
        weights.append(w)
        ids.append(chosen)
    if T == 0:
        return logits.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return torch.stack(weights), torch.tensor(ids, dtype=torch.int64)


def fused_topk(gating, k, renormalize):
    T, E = gating.shape
    weights, ids = [], []
    for t in range(T):
        probs = softmax(gating[t])
        chosen = _top_k_indices(probs.detach(), k)
        w = torch.stack([probs[e] for e in chosen])
        if renormalize:
            w = w / w.sum()
        weights.append(w)
        ids.append(chosen)
    token_expert_indices = torch.tensor(
        [[j * T + t for j in range(k)] for t in range(T)], dtype=torch.int64
    ).view(T, k)
    if T == 0:
        return gating.new_zeros(0, k), torch.zeros(0, k, dtype=torch.int64), token_expert_indices
    return torch.stack(weights), torch.tensor(ids, dtype=torch.int64), token_expert_indices


def grove_layer(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size, adjugate_scale):
    T, H = x.shape
    k = topk_ids.shape[1]
    # unbind once: per-expert views whose backward is one stack, not a scatter per use
    w1, w2, a1, a2 = w1.unbind(0), w2.unbind(0), a1.unbind(0), a2.unbind(0)
    rows = []
    for t in range(T):
        x_t, w_t = x[t], topk_weights[t].unbind(0)
        y = x.new_zeros(H)
        group_weight = {}  # group -> Σ w of this token's experts in it
        for j in range(k):
            e = int(topk_ids[t, j])
            y = y + w_t[j] * glu_mlp(x_t, w1[e], w2[e])
            g = e // group_size
            group_weight[g] = group_weight.get(g, 0.0) + w_t[j]
        for g, gw in group_weight.items():  # once per distinct group: the adjugate is shared
            y = y + adjugate_scale * gw * glu_mlp(x_t, a1[g], a2[g])
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, H)


def grove_moe(x, logits, w1, w2, a1, a2, top_k, group_size, adjugate_scale, renormalize=True,
              selection_bias=None):
    w, ids = grove_topk(logits, top_k, renormalize, selection_bias)
    return grove_layer(x, w1, w2, a1, a2, w, ids, group_size, adjugate_scale)


def fused_experts(x, w1, w2, topk_weights, topk_ids, activation="silu",
                  apply_router_weight_on_input=False, expert_map=None):
    T, H = x.shape
    k = topk_ids.shape[1]
    w1, w2 = w1.unbind(0), w2.unbind(0)
    rows = []
    for t in range(T):
        x_t, w_t = x[t], topk_weights[t].unbind(0)
        y = x.new_zeros(H)
        for j in range(k):
            e = int(topk_ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:  # expert lives on another rank
                    continue
            if apply_router_weight_on_input:
                y = y + glu_mlp(w_t[j] * x_t, w1[e], w2[e], activation)
            else:
                y = y + w_t[j] * glu_mlp(x_t, w1[e], w2[e], activation)
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, H)


def fused_moe(x, w1, w2, gating, topk, renormalize, activation="silu", expert_map=None):
    w, ids, _ = fused_topk(gating, topk, renormalize)
    return fused_experts(x, w1, w2, w, ids, activation=activation, expert_map=expert_map)
