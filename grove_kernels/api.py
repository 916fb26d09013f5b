"""Public functions of grove-kernels (docs/design.md §2): metadata validation, then the ops of
ops.py.

    grove_topk           logits [T, E] -> w fp32 [T, k], ids int32 [T, k]
    fused_grove_experts  x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia],
                         w [T, k], ids [T, k] -> y [T, H]       (G = E / S)
    grove_moe            grove_topk + fused_grove_experts (gradients reach the logits)
    fused_experts / fused_moe / fused_topk   vLLM drop-ins (plain MoE, same layouts)

Each public function checks its arguments' metadata (shapes, dtypes, devices) once, then calls
the ops; functions built on others call their unchecked halves (_grove_experts, _experts). Only
metadata is read here, so torch.compile traces it without graph breaks; value checks live in
the ops.
"""
import torch

from . import _validate as v
from . import ops

_FLOAT = v.FLOAT_DTYPES
_INDEX = v.INDEX_DTYPES


def _check_logits(name, logits, top_k, num_tokens=None, top_k_name="top_k"):
    v.tensor(name, logits, 2, _FLOAT)
    if num_tokens is not None and logits.shape[0] != num_tokens:
        raise ValueError(f"{name}: expected {num_tokens} rows (tokens of hidden_states), "
                         f"got shape {tuple(logits.shape)}")
    v.positive_int(top_k_name, top_k, logits.shape[1], f"the {logits.shape[1]} experts of {name}")


def _check_bias(bias, logits):
    if bias is None:
        return
    v.tensor("selection_bias", bias, 1, _FLOAT)
    v.shape("selection_bias", bias, (logits.shape[1],))
    v.same_device("router_logits", logits, selection_bias=bias)


def _check_weights(x, w1, w2):
    """Shapes of x, w1, w2. Returns (E, H)."""
    v.tensor("hidden_states", x, 2, _FLOAT)
    v.tensor("w1", w1, 3, _FLOAT)
    E, I2, H = w1.shape
    if I2 % 2 or E < 1 or I2 < 2:
        raise ValueError(f"w1: expected [E, 2I, H] with E >= 1 and I >= 1, got shape "
                         f"{tuple(w1.shape)}")
    v.tensor("w2", w2, 3, _FLOAT)
    if H == w2.shape[1] != x.shape[1]:  # both weights agree: the activations are wrong
        raise ValueError(f"hidden_states: expected hidden size {H} (that of w1 and w2), got "
                         f"shape {tuple(x.shape)}")
    H = x.shape[1]
    if H != w1.shape[2]:  # e.g. w1 passed as [E, H, 2I]: its middle dimension is no 2I
        I = w2.shape[2] if w2.shape[0] == E else I2 // 2
        raise ValueError(f"w1: expected shape {(E, 2 * I, H)} ([E, 2I, H]: H of hidden_states, "
                         f"I of w2), got shape {tuple(w1.shape)}")
    v.shape("w2", w2, (E, H, I2 // 2))
    v.same_dtype("hidden_states", x, w1=w1, w2=w2)
    v.same_device("hidden_states", x, w1=w1, w2=w2)
    return E, H


def _check_routing(x, topk_weights, topk_ids, num_ids):
    """topk_ids [T, k] (1 <= k <= num_ids) and topk_weights of the same shape."""
    T = x.shape[0]
    v.tensor("topk_ids", topk_ids, 2, _INDEX)
    if topk_ids.shape[0] != T or not 1 <= topk_ids.shape[1] <= num_ids:
        raise ValueError(f"topk_ids: expected shape ({T}, k) with 1 <= k <= {num_ids} (the "
                         f"experts), got shape {tuple(topk_ids.shape)}")
    v.tensor("topk_weights", topk_weights, 2, _FLOAT)
    v.shape("topk_weights", topk_weights, topk_ids.shape)
    v.same_device("hidden_states", x, topk_weights=topk_weights, topk_ids=topk_ids)


def _check_adjugates(x, a1, a2, E, group_size, adjugate_scale):
    H = x.shape[1]
    v.positive_int("group_size", group_size)
    if E % group_size:
        raise ValueError(f"group_size: must divide the {E} experts of w1, got {group_size}")
    G = E // group_size
    v.tensor("a1", a1, 3, _FLOAT)
    if a1.shape[0] != G or a1.shape[1] % 2 or a1.shape[1] < 2 or a1.shape[2] != H:
        raise ValueError(f"a1: expected [G={G}, 2Ia, H={H}] (G = experts / group_size), got "
                         f"shape {tuple(a1.shape)}")
    v.tensor("a2", a2, 3, _FLOAT)
    v.shape("a2", a2, (G, H, a1.shape[1] // 2))
    v.same_dtype("hidden_states", x, a1=a1, a2=a2)
    v.same_device("hidden_states", x, a1=a1, a2=a2)
    if not isinstance(adjugate_scale, (int, float)) or isinstance(adjugate_scale, bool):
        raise TypeError(f"adjugate_scale: expected a float, got {type(adjugate_scale).__name__}")


def _check_expert_map(expert_map, global_num_experts, E, x, group_size=1):
    """Returns the number of global experts that topk_ids index."""
    if expert_map is None:
        if global_num_experts not in (-1, E):
            raise ValueError(f"global_num_experts: expected -1 or {E} (experts of w1) without "
                             f"expert_map, got {global_num_experts}")
        return E
    v.tensor("expert_map", expert_map, 1, _INDEX)
    v.same_device("hidden_states", x, expert_map=expert_map)
    n = expert_map.shape[0]
    if global_num_experts not in (-1, n):
        raise ValueError(f"expert_map: expected global_num_experts={global_num_experts} entries, "
                         f"got shape {tuple(expert_map.shape)}")
    if n < E or n % group_size:
        raise ValueError(f"expert_map: expected at least {E} entries (experts of w1), a multiple "
                         f"of group_size={group_size}, got shape {tuple(expert_map.shape)}")
    return n


def grove_topk(router_logits, top_k, *, renormalize=True, selection_bias=None):
    """Grove routing: ids = top-k of sigmoid(logits) + bias, weights = softmax(logits)[ids].

    Returns (weights fp32 [T, k], ids int32 [T, k]); the weights are differentiable in
    router_logits, the bias only steers selection.
    """
    _check_logits("router_logits", router_logits, top_k)
    _check_bias(selection_bias, router_logits)
    return ops.topk(router_logits, top_k, bool(renormalize), selection_bias)


def _grove_experts(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size, adjugate_scale,
                   expert_map=None):
    return ops.experts(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
                       float(adjugate_scale), False)


def fused_grove_experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, *, group_size=2,
                        adjugate_scale=0.05, expert_map=None):
    """The Grove MoE layer given its routing: experts plus each selected group's adjugate once.

    expert_map (vLLM semantics, expert parallel): global expert id -> local index into w1/w2,
    -1 for experts not on this rank; topk_ids are then global ids. A group's experts must all
    be local (in one local group) or all off this rank; the adjugates of local groups only are
    computed (a1/a2 hold the local groups).
    """
    E, _ = _check_weights(hidden_states, w1, w2)
    _check_adjugates(hidden_states, a1, a2, E, group_size, adjugate_scale)
    n_ids = _check_expert_map(expert_map, -1, E, hidden_states, group_size)
    _check_routing(hidden_states, topk_weights, topk_ids, n_ids)
    return _grove_experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, group_size,
                          adjugate_scale, expert_map)


def grove_moe(hidden_states, router_logits, w1, w2, a1, a2, *, top_k, group_size=2,
              adjugate_scale=0.05, renormalize=True, selection_bias=None):
    """Routing + Grove layer in one call; differentiable in the router logits too."""
    E, _ = _check_weights(hidden_states, w1, w2)
    _check_adjugates(hidden_states, a1, a2, E, group_size, adjugate_scale)
    _check_logits("router_logits", router_logits, top_k, hidden_states.shape[0])
    if router_logits.shape[1] != E:
        raise ValueError(f"router_logits: expected {E} columns (experts of w1), got "
                         f"shape {tuple(router_logits.shape)}")
    v.same_device("hidden_states", hidden_states, router_logits=router_logits)
    _check_bias(selection_bias, router_logits)
    topk_weights, topk_ids = ops.topk(router_logits, top_k, bool(renormalize), selection_bias)
    return _grove_experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, group_size,
                          adjugate_scale)


def _check_activation(activation):
    if activation != "silu":
        raise ValueError(f"activation: only 'silu' (SwiGLU) is supported, got {activation!r}")


def _check_inplace(inplace, hidden_states, **differentiable):
    if not inplace:
        return
    if any(s == 0 and n > 1 for s, n in zip(hidden_states.stride(), hidden_states.shape)):
        raise ValueError(f"inplace: hidden_states is an expanded view (strides "
                         f"{hidden_states.stride()}: rows share memory), so the result cannot be "
                         f"written into it; call with inplace=False")
    if not torch.is_grad_enabled():
        return
    # Any gradient of the op needs hidden_states as it was: writing the result into it would
    # only fail in the backward, far from the call.
    for name, t in dict(hidden_states=hidden_states, **differentiable).items():
        if t is not None and t.requires_grad:
            raise ValueError(f"inplace: {name} requires grad, and the backward needs "
                             f"hidden_states as it was, so the result cannot be written into "
                             f"it; call with inplace=False")


def _experts(x, w1, w2, topk_weights, topk_ids, inplace, weight_on_input, expert_map):
    # A plain MoE: no a1 / a2, group_size 0 (no groups), as in its plan.
    y = ops.experts(x, w1, w2, None, None, topk_weights, topk_ids, expert_map, 0, 0.0,
                    bool(weight_on_input))
    return x.copy_(y) if inplace else y


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation="silu",
                  apply_router_weight_on_input=False, global_num_experts=-1, expert_map=None):
    """vLLM's fused_experts: y_t = Σ_j w_tj · E_{ids_tj}(x_t) (or E(w·x) when the router weight
    is applied on the input). With expert_map, ids are global and experts mapped to -1 skipped.
    """
    E, _ = _check_weights(hidden_states, w1, w2)
    _check_activation(activation)
    n_ids = _check_expert_map(expert_map, global_num_experts, E, hidden_states)
    _check_routing(hidden_states, topk_weights, topk_ids, n_ids)
    _check_inplace(inplace, hidden_states, w1=w1, w2=w2, topk_weights=topk_weights)
    return _experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace,
                    apply_router_weight_on_input, expert_map)


def _token_expert_indices(T, topk, device):
    source = torch.arange(topk, device=device, dtype=torch.int32) * T
    return source[None, :] + torch.arange(T, device=device, dtype=torch.int32)[:, None]


def fused_topk(hidden_states, gating_output, topk, renormalize):
    """vLLM's fused_topk: softmax routing. Returns (weights fp32 [T, k], ids int32 [T, k],
    token_expert_indices int32 [T, k] with entry (t, j) = j * T + t)."""
    v.tensor("hidden_states", hidden_states, 2, _FLOAT)
    _check_logits("gating_output", gating_output, topk, hidden_states.shape[0], "topk")
    v.same_device("hidden_states", hidden_states, gating_output=gating_output)
    weights, ids = ops.topk(gating_output, topk, bool(renormalize), None)
    return weights, ids, _token_expert_indices(gating_output.shape[0], topk,
                                               gating_output.device)


def fused_moe(hidden_states, w1, w2, gating_output, topk, renormalize, inplace=False,
              activation="silu", global_num_experts=-1, expert_map=None):
    """vLLM's fused_moe: fused_topk (softmax routing) followed by fused_experts."""
    E, _ = _check_weights(hidden_states, w1, w2)
    _check_activation(activation)
    n_ids = _check_expert_map(expert_map, global_num_experts, E, hidden_states)
    _check_logits("gating_output", gating_output, topk, hidden_states.shape[0], "topk")
    if gating_output.shape[1] != n_ids:
        raise ValueError(f"gating_output: expected {n_ids} columns (experts of "
                         f"{'expert_map' if expert_map is not None else 'w1'}), got shape "
                         f"{tuple(gating_output.shape)}")
    v.same_device("hidden_states", hidden_states, gating_output=gating_output)
    _check_inplace(inplace, hidden_states, w1=w1, w2=w2, gating_output=gating_output)
    weights, ids = ops.topk(gating_output, topk, bool(renormalize), None)
    return _experts(hidden_states, w1, w2, weights, ids, inplace, False, expert_map)
