"""Public functions of grove-kernels (DESIGN §2): validation, then the custom ops of ops.py.

    grove_topk           logits [T, E] -> w fp32 [T, k], ids int32 [T, k]
    fused_grove_experts  x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia],
                         w [T, k], ids [T, k] -> y [T, H]       (G = E / S)
    grove_moe            grove_topk + fused_grove_experts (gradients reach the logits)
    fused_experts / fused_moe / fused_topk   vLLM drop-ins (plain MoE, same layouts)

Everything here checks metadata only (shapes, dtypes, devices), so torch.compile traces it
without graph breaks; value checks live in the ops.
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


def _check_experts(x, w1, w2, topk_weights, topk_ids):
    """Shapes of x, w1, w2 and the routing tensors; returns (T, H, E, I)."""
    v.tensor("hidden_states", x, 2, _FLOAT)
    T, H = x.shape
    v.tensor("w1", w1, 3, _FLOAT)
    E, I2, _ = w1.shape
    if I2 % 2:
        raise ValueError(f"w1: expected [E, 2I, H] with an even middle dimension, got shape "
                         f"{tuple(w1.shape)}")
    I = I2 // 2
    if E < 1 or I < 1:
        raise ValueError(f"w1: expected at least one expert and I >= 1, got shape {tuple(w1.shape)}")
    v.shape("w1", w1, (E, 2 * I, H))
    v.tensor("w2", w2, 3, _FLOAT)
    v.shape("w2", w2, (E, H, I))
    v.tensor("topk_weights", topk_weights, 2, _FLOAT)
    v.tensor("topk_ids", topk_ids, 2, _INDEX)
    if topk_weights.shape[0] != T or topk_weights.shape[1] < 1:
        raise ValueError(f"topk_weights: expected shape ({T}, k) with k >= 1, got shape "
                         f"{tuple(topk_weights.shape)}")
    v.shape("topk_ids", topk_ids, topk_weights.shape)
    v.same_dtype("hidden_states", x, w1=w1, w2=w2)
    v.same_device("hidden_states", x, w1=w1, w2=w2, topk_weights=topk_weights,
                  topk_ids=topk_ids)
    return T, H, E, I


def _check_adjugates(x, a1, a2, E, group_size, adjugate_scale, top_k, n_ids=None):
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
    n_ids = E if n_ids is None else n_ids
    if top_k > n_ids:
        raise ValueError(f"topk_ids: top_k = {top_k} exceeds the {n_ids} experts")


def _check_bias(bias, logits):
    if bias is None:
        return
    v.tensor("selection_bias", bias, 1, _FLOAT)
    v.shape("selection_bias", bias, (logits.shape[1],))
    v.same_device("router_logits", logits, selection_bias=bias)


def grove_topk(router_logits, top_k, *, renormalize=True, selection_bias=None):
    """Grove routing: ids = top-k of sigmoid(logits) + bias, weights = softmax(logits)[ids].

    Returns (weights fp32 [T, k], ids int32 [T, k]); the weights are differentiable in
    router_logits, the bias only steers selection.
    """
    _check_logits("router_logits", router_logits, top_k)
    _check_bias(selection_bias, router_logits)
    return ops.topk(router_logits, top_k, bool(renormalize), selection_bias)


def _experts(x, w1, w2, a1, a2, topk_weights, topk_ids, *args):
    """The experts op; when autograd will need a backward, the variant that keeps what the
    backend saves for it (grove::experts_forward_train)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, w1, w2, a1, a2, topk_weights)):
        return ops.experts_forward_train(x, w1, w2, a1, a2, topk_weights, topk_ids, *args)[0]
    return ops.experts_forward(x, w1, w2, a1, a2, topk_weights, topk_ids, *args)


def fused_grove_experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, *, group_size=2,
                        adjugate_scale=0.05, expert_map=None):
    """The Grove MoE layer given its routing: experts plus each selected group's adjugate once.

    expert_map (vLLM semantics, expert parallel): global expert id -> local index into w1/w2,
    -1 for experts not on this rank; topk_ids are then global ids. A group's experts must all
    be local (in one local group) or all off this rank; the adjugates of local groups only are
    computed (a1/a2 hold the local groups).
    """
    T, H, E, I = _check_experts(hidden_states, w1, w2, topk_weights, topk_ids)
    _check_expert_map(expert_map, -1, E, hidden_states)
    n_ids = E if expert_map is None else expert_map.shape[0]
    _check_adjugates(hidden_states, a1, a2, E, group_size, adjugate_scale, topk_ids.shape[1],
                     n_ids)
    if expert_map is not None and expert_map.shape[0] % group_size:
        raise ValueError(f"expert_map: its {expert_map.shape[0]} global experts do not split "
                         f"into groups of group_size={group_size}")
    return _experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map,
                    group_size, float(adjugate_scale), False)


def grove_moe(hidden_states, router_logits, w1, w2, a1, a2, *, top_k, group_size=2,
              adjugate_scale=0.05, renormalize=True, selection_bias=None):
    """Routing + Grove layer in one call; differentiable in the router logits too."""
    v.tensor("hidden_states", hidden_states, 2, _FLOAT)
    _check_logits("router_logits", router_logits, top_k, hidden_states.shape[0])
    v.same_device("hidden_states", hidden_states, router_logits=router_logits)
    _check_bias(selection_bias, router_logits)
    if router_logits.shape[1] != w1.shape[0]:
        raise ValueError(f"router_logits: expected {w1.shape[0]} columns (experts of w1), got "
                         f"shape {tuple(router_logits.shape)}")
    topk_weights, topk_ids = grove_topk(router_logits, top_k, renormalize=renormalize,
                                        selection_bias=selection_bias)
    return fused_grove_experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids,
                               group_size=group_size, adjugate_scale=adjugate_scale)


def _check_activation(activation):
    if activation != "silu":
        raise ValueError(f"activation: only 'silu' (SwiGLU) is supported, got {activation!r}")


def _check_expert_map(expert_map, global_num_experts, E, x):
    if expert_map is None:
        if global_num_experts not in (-1, E):
            raise ValueError(f"global_num_experts: expected -1 or {E} (experts of w1) without "
                             f"expert_map, got {global_num_experts}")
        return
    v.tensor("expert_map", expert_map, 1, _INDEX)
    v.same_device("hidden_states", x, expert_map=expert_map)
    n = expert_map.shape[0]
    if global_num_experts not in (-1, n):
        raise ValueError(f"expert_map: expected global_num_experts={global_num_experts} entries, "
                         f"got shape {tuple(expert_map.shape)}")
    if n < E:
        raise ValueError(f"expert_map: expected at least {E} entries (experts of w1), got shape "
                         f"{tuple(expert_map.shape)}")


def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace=False, activation="silu",
                  apply_router_weight_on_input=False, global_num_experts=-1, expert_map=None):
    """vLLM's fused_experts: y_t = Σ_j w_tj · E_{ids_tj}(x_t) (or E(w·x) when the router weight
    is applied on the input). With expert_map, ids are global and experts mapped to -1 skipped.
    """
    T, H, E, I = _check_experts(hidden_states, w1, w2, topk_weights, topk_ids)
    _check_activation(activation)
    _check_expert_map(expert_map, global_num_experts, E, hidden_states)
    n_ids = E if expert_map is None else expert_map.shape[0]
    if topk_ids.shape[1] > n_ids:
        raise ValueError(f"topk_ids: top_k = {topk_ids.shape[1]} exceeds the {n_ids} experts")
    y = _experts(hidden_states, w1, w2, None, None, topk_weights, topk_ids, expert_map,
                 1, 0.0, bool(apply_router_weight_on_input))
    if inplace:
        return hidden_states.copy_(y)
    return y


def fused_topk(hidden_states, gating_output, topk, renormalize):
    """vLLM's fused_topk: softmax routing. Returns (weights fp32 [T, k], ids int32 [T, k],
    token_expert_indices int32 [T, k] with entry (t, j) = j * T + t)."""
    v.tensor("hidden_states", hidden_states, 2, _FLOAT)
    _check_logits("gating_output", gating_output, topk, hidden_states.shape[0], "topk")
    v.same_device("hidden_states", hidden_states, gating_output=gating_output)
    weights, ids = ops.topk(gating_output, topk, bool(renormalize), None)
    T = gating_output.shape[0]
    source = torch.arange(topk, device=gating_output.device, dtype=torch.int32) * T
    token_expert_indices = source[None, :] + torch.arange(
        T, device=gating_output.device, dtype=torch.int32)[:, None]
    return weights, ids, token_expert_indices


def fused_moe(hidden_states, w1, w2, gating_output, topk, renormalize, inplace=False,
              activation="silu", global_num_experts=-1, expert_map=None):
    """vLLM's fused_moe: fused_topk (softmax routing) followed by fused_experts."""
    v.tensor("gating_output", gating_output, 2, _FLOAT)
    v.tensor("w1", w1, 3, _FLOAT)
    n_experts = expert_map.shape[0] if isinstance(expert_map, torch.Tensor) else w1.shape[0]
    if gating_output.shape[1] != n_experts:
        raise ValueError(f"gating_output: expected {n_experts} columns (experts of "
                         f"{'expert_map' if expert_map is not None else 'w1'}), got shape "
                         f"{tuple(gating_output.shape)}")
    weights, ids, _ = fused_topk(hidden_states, gating_output, topk, renormalize)
    return fused_experts(hidden_states, w1, w2, weights, ids, inplace=inplace,
                         activation=activation, global_num_experts=global_num_experts,
                         expert_map=expert_map)
