"""The custom ops of grove-kernels: schemas, fake kernels and autograd, in one place.

    grove::topk              logits [T, E] -> weights fp32 [T, k], ids int32 [T, k]
    grove::experts_forward   x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H]?, a2 [G, H, Ia]?,
                             topk_weights [T, k], topk_ids [T, k], expert_map [E_global]? -> y [T, H]
    grove::experts_forward_train   the same -> (y [T, H], saved [n]): what the backend keeps for
                             its backward (n = backend.saved_numel(...), 0 when it recomputes)
    grove::experts_backward  dy [T, H] + the forward's inputs (+ saved) -> dx, dw1, dw2, da1, da2,
                             d topk_weights

a1/a2 absent means a plain MoE (the vLLM drop-ins). The backend is chosen here, when an op
runs, from the configured name and the device of its inputs (backends.resolve); backends only
implement. Value checks (ids in range) run here too: inside the op they are invisible to
torch.compile, so a compiled graph needs no break for them.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _validate, backends


def _impl(device, dtype=None):
    return backends.module(backends.resolve(device, dtype))


def _check_groups(w1, a1, group_size):
    # Metadata only, repeated here because the ops are public too: a group count that does not
    # match would index rows past the plan's adjugate section.
    E = w1.shape[0]
    if a1 is not None and (group_size < 1 or E % group_size or a1.shape[0] != E // group_size):
        raise ValueError(f"group_size: {group_size} does not split the {E} experts of w1 into "
                         f"the {a1.shape[0]} groups of a1")


def _check_ids(topk_ids, num_experts, expert_map, group_size=1, grove=False):
    if expert_map is None:
        _validate.ids_in_range("topk_ids", topk_ids, 0, num_experts)
    else:
        _validate.ids_in_range("topk_ids", topk_ids, 0, expert_map.shape[0])
        _validate.ids_in_range("expert_map", expert_map, -1, num_experts)
        if grove:
            _validate.groups_whole(expert_map, group_size)


# ---- routing -------------------------------------------------------------------------------

@torch.library.custom_op("grove::topk", mutates_args=())
def topk(router_logits: Tensor, top_k: int, renormalize: bool,
         selection_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    _validate.all_finite("selection_bias", selection_bias)
    return _impl(router_logits.device).topk(router_logits, top_k, renormalize, selection_bias)


@topk.register_fake
def _(router_logits, top_k, renormalize, selection_bias):
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=torch.float32),
            router_logits.new_empty(T, top_k, dtype=torch.int32))


def _topk_setup(ctx, inputs, output):
    router_logits, _, renormalize, _ = inputs
    weights, ids = output
    ctx.renormalize = renormalize
    ctx.logits_dtype = router_logits.dtype
    ctx.mark_non_differentiable(ids)
    ctx.save_for_backward(router_logits, weights, ids)


def _topk_backward(ctx, grad_weights, grad_ids):
    router_logits, weights, ids = ctx.saved_tensors
    p = torch.softmax(router_logits.float(), dim=-1)
    dw = grad_weights.float()
    idx = ids.long()
    if ctx.renormalize:
        # w = p_sel / s, s = Σ p_sel  =>  d p_sel = (dw - Σ dw·w) / s
        s = p.gather(1, idx).sum(-1, keepdim=True)
        dw = (dw - (dw * weights).sum(-1, keepdim=True)) / s
    dp = torch.zeros_like(p).scatter(1, idx, dw)
    d_logits = p * (dp - (dp * p).sum(-1, keepdim=True))
    return d_logits.to(ctx.logits_dtype), None, None, None


topk.register_autograd(_topk_backward, setup_context=_topk_setup)


# ---- experts (+ adjugates) -----------------------------------------------------------------

def _saved_numel(x, w1, a1, topk_ids):
    """Elements the backend keeps from a training forward for its backward (0: recomputes)."""
    fn = getattr(_impl(x.device, x.dtype), "saved_numel", None)
    if fn is None or x.shape[0] == 0:
        return 0
    T, k = topk_ids.shape
    G, Ia = (a1.shape[0], a1.shape[1] // 2) if a1 is not None else (0, 0)
    return fn(T, k, w1.shape[0], G, w1.shape[1] // 2, Ia)


def _matching_saved(x, w1, a1, topk_ids, saved):
    """saved, when the backend running the backward is the one that wrote it."""
    if saved is None or saved.numel() == 0 or saved.numel() != _saved_numel(x, w1, a1, topk_ids):
        return None
    return saved


@torch.library.custom_op("grove::experts_forward", mutates_args=())
def experts_forward(hidden_states: Tensor, w1: Tensor, w2: Tensor, a1: Optional[Tensor],
                    a2: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor,
                    expert_map: Optional[Tensor], group_size: int, adjugate_scale: float,
                    weight_on_input: bool) -> Tensor:
    _check_groups(w1, a1, group_size)
    _check_ids(topk_ids, w1.shape[0], expert_map, group_size, a1 is not None)
    if hidden_states.shape[0] == 0:  # an empty batch: no backend has anything to launch
        return torch.empty_like(hidden_states)
    return _impl(hidden_states.device, hidden_states.dtype).experts_forward(
        hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
        adjugate_scale, weight_on_input)


@experts_forward.register_fake
def _(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
      adjugate_scale, weight_on_input):
    return torch.empty_like(hidden_states)


@torch.library.custom_op("grove::experts_forward_train", mutates_args=())
def experts_forward_train(hidden_states: Tensor, w1: Tensor, w2: Tensor, a1: Optional[Tensor],
                          a2: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor,
                          expert_map: Optional[Tensor], group_size: int, adjugate_scale: float,
                          weight_on_input: bool) -> Tuple[Tensor, Tensor]:
    """experts_forward for autograd: also returns what the backend saves for its backward
    (the cuda backend: GEMM-1's pre-activations, so the backward does not recompute GEMM-1)."""
    _check_groups(w1, a1, group_size)
    _check_ids(topk_ids, w1.shape[0], expert_map, group_size, a1 is not None)
    # Backends write every element (rows of no problem zeroed), so no memset here.
    saved = hidden_states.new_empty(_saved_numel(hidden_states, w1, a1, topk_ids))
    if hidden_states.shape[0] == 0:
        return torch.empty_like(hidden_states), saved
    kw = {"saved": saved} if saved.numel() else {}
    y = _impl(hidden_states.device, hidden_states.dtype).experts_forward(
        hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
        adjugate_scale, weight_on_input, **kw)
    return y, saved


@experts_forward_train.register_fake
def _(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
      adjugate_scale, weight_on_input):
    return (torch.empty_like(hidden_states),
            hidden_states.new_empty(_saved_numel(hidden_states, w1, a1, topk_ids)))


@torch.library.custom_op("grove::experts_backward", mutates_args=())
def experts_backward(grad_out: Tensor, hidden_states: Tensor, w1: Tensor, w2: Tensor,
                     a1: Optional[Tensor], a2: Optional[Tensor], topk_weights: Tensor,
                     topk_ids: Tensor, expert_map: Optional[Tensor], group_size: int,
                     adjugate_scale: float, weight_on_input: bool,
                     saved: Optional[Tensor] = None) -> List[Tensor]:
    """[dx, dw1, dw2, da1, da2, d topk_weights]; da1/da2 are empty when a1/a2 are absent.
    saved: experts_forward_train's second output (used when the same backend wrote it)."""
    _check_groups(w1, a1, group_size)
    _check_ids(topk_ids, w1.shape[0], expert_map, group_size, a1 is not None)
    if hidden_states.shape[0] == 0:  # an empty batch: every gradient is zero
        return [torch.zeros_like(hidden_states), torch.zeros_like(w1), torch.zeros_like(w2),
                torch.zeros_like(a1) if a1 is not None else w1.new_empty(0),
                torch.zeros_like(a2) if a2 is not None else w1.new_empty(0),
                torch.zeros_like(topk_weights)]
    saved = _matching_saved(hidden_states, w1, a1, topk_ids, saved)
    kw = {"saved": saved} if saved is not None else {}
    grads = _impl(hidden_states.device, hidden_states.dtype).experts_backward(
        grad_out, hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map,
        group_size, adjugate_scale, weight_on_input, **kw)
    return [g if g is not None else w1.new_empty(0) for g in grads]


@experts_backward.register_fake
def _(grad_out, hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
      adjugate_scale, weight_on_input, saved=None):
    return [torch.empty_like(hidden_states), torch.empty_like(w1), torch.empty_like(w2),
            torch.empty_like(a1) if a1 is not None else w1.new_empty(0),
            torch.empty_like(a2) if a2 is not None else w1.new_empty(0),
            torch.empty_like(topk_weights)]


_DIFFERENTIABLE = (0, 1, 2, 3, 4, 5)  # hidden_states, w1, w2, a1, a2, topk_weights


def _experts_setup(ctx, inputs, output, saved=None):
    (x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size, adjugate_scale,
     weight_on_input) = inputs
    ctx.save_for_backward(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, saved)
    ctx.config = (group_size, adjugate_scale, weight_on_input)


def _experts_backward(ctx, grad_out):
    x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, saved = ctx.saved_tensors
    grads = experts_backward(grad_out.contiguous(), x, w1, w2, a1, a2, topk_weights, topk_ids,
                             expert_map, *ctx.config, saved)
    needs = ctx.needs_input_grad
    out = [g if needs[i] else None for i, g in zip(_DIFFERENTIABLE, grads)]
    if a1 is None:
        out[3] = out[4] = None
    return (*out, None, None, None, None, None)


experts_forward.register_autograd(_experts_backward, setup_context=_experts_setup)


def _experts_train_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    _experts_setup(ctx, inputs, output[0], saved=output[1])


def _experts_train_backward(ctx, grad_out, grad_saved):
    return _experts_backward(ctx, grad_out)


experts_forward_train.register_autograd(_experts_train_backward,
                                        setup_context=_experts_train_setup)
