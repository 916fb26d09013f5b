"""The custom ops of grove-kernels: schemas, fake kernels, autograd and value checks, in one place.

    grove::topk              logits [T, E], top_k, renormalize, bias [E]?, backend
                             -> weights [T, k] (fp64 for fp64 logits, else fp32), ids int32 [T, k]
    grove::experts_forward   x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H]?,
                             a2 [G, H, Ia]?, topk_weights [T, k], topk_ids [T, k],
                             expert_map [E_global]?, group_size, adjugate_scale, weight_on_input,
                             save, backend, layout -> (y [T, H], saved)
    grove::experts_backward  dy [T, H], x, w1, w2, a1?, a2?, topk_weights, saved, group_size,
                             adjugate_scale, weight_on_input, backend, layout
                             -> [dx, dw1, dw2, da1, da2, d topk_weights]

a1/a2 absent means a plain MoE (the vLLM drop-ins). `saved` is empty unless `save`: then it
holds the plan's tensors and the activations of experts.py (the same layout on every
backend), so the backward never rebuilds the plan nor recomputes GEMM-1.

`backend` names the backend that runs the op. topk() and experts() below (what api.py calls)
resolve it once from the configured one before the op runs (backends.resolve), so the choice
is a visible argument: the backward runs on the backend that wrote `saved`, and under
torch.compile the choice is made at trace time. The op takes the backend object by name
(backends.get: the one place a backend that cannot run the call is refused; an op called
directly with "auto" resolves it there) and runs its stages: plan, then experts.

`layout` is the adjugate layout: "sections" (E expert + G adjugate problems, plan.py) or
"folded" (adjugates on their group's leader expert rows, plan_folded.py). experts() reads it
per call (backends.requested_layout(): GROVE_ADJUGATE_LAYOUT, else the backend's
default_layout); calls without
adjugates always run the sections plan (the layouts coincide there).

Metadata checks (shapes, dtypes, devices) happen once, in api.py; the ops repeat only the group
count, for callers of torch.ops.grove (the kernels' memory safety rests on it). Value checks
(ids in range, expert_map entries) happen here, inside the ops, where torch.compile sees no
data-dependent Python.
"""
from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import backends
from . import experts as experts_stage
from . import settings as values
from .experts import Weights
from .routing import acc_dtype
from .settings import ADJUGATE_LAYOUTS


def _check_autodiff(op, *tensors):
    """Reverse-mode autograd is what the ops implement. torch.func transforms and forward-mode
    AD would reach no formula and silently give zero tangents: refuse them by name."""
    if torch.compiler.is_compiling():  # dynamo traces no functorch transform in here
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise NotImplementedError(
            f"{op}: torch.func transforms (grad, vjp, jvp, vmap, ...) are not supported; use "
            f"torch.autograd (loss.backward() or torch.autograd.grad)")
    if fwAD._current_level >= 0 and any(
            t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"{op}: forward-mode AD (torch.autograd.forward_ad) is not supported; use reverse "
            f"mode (loss.backward() or torch.autograd.grad)")


def _check_groups(w1, a1, group_size):
    # Adjugate rows index a1 by expert id // group_size: a group count that does not match
    # would read past a1 (api.py checks it too, with the other shapes).
    E = w1.shape[0]
    if a1 is not None and (group_size < 1 or E % group_size or a1.shape[0] != E // group_size):
        raise ValueError(f"group_size: {group_size} does not split the {E} experts of w1 into "
                         f"the {a1.shape[0]} groups of a1 (a1: expected [G = E / group_size, "
                         f"2Ia, H])")


def _check_values(topk_ids, num_experts, expert_map, group_size, grove):
    if expert_map is None:
        values.ids_in_range("topk_ids", topk_ids, 0, num_experts)
        return
    values.ids_in_range("topk_ids", topk_ids, 0, expert_map.shape[0])
    values.ids_in_range("expert_map", expert_map, -1, num_experts)
    if grove:
        values.groups_whole(expert_map, group_size)


def _check_layout(layout, backend, grove):
    if layout not in ADJUGATE_LAYOUTS:
        raise ValueError(f"layout: expected one of {ADJUGATE_LAYOUTS}, got {layout!r}")
    if layout == "folded" and grove and layout not in backend.layouts:
        raise ValueError(f"GROVE_ADJUGATE_LAYOUT: backend {backend.name!r} does not run the "
                         f"folded layout; use sections")


# ---- routing -------------------------------------------------------------------------------

@torch.library.custom_op("grove::topk", mutates_args=())
def _topk(router_logits: Tensor, top_k: int, renormalize: bool, selection_bias: Optional[Tensor],
          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    stages = backends.get(backend, router_logits)
    values.all_finite("selection_bias", selection_bias)
    return stages.topk(router_logits, top_k, renormalize, selection_bias)


@_topk.register_fake
def _(router_logits, top_k, renormalize, selection_bias, backend="auto"):
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=acc_dtype(router_logits.dtype)),
            router_logits.new_empty(T, top_k, dtype=torch.int32))


def _topk_setup(ctx, inputs, output):
    router_logits, _, renormalize, _, _ = inputs
    weights, ids = output
    ctx.renormalize = renormalize
    ctx.logits_dtype = router_logits.dtype
    ctx.mark_non_differentiable(ids)
    ctx.save_for_backward(router_logits, weights, ids)


def _topk_backward(ctx, grad_weights, grad_ids):
    router_logits, weights, ids = ctx.saved_tensors
    p = torch.softmax(router_logits.to(acc_dtype(router_logits.dtype)), dim=-1)
    dw = grad_weights.to(p.dtype)
    idx = ids.long()
    if ctx.renormalize:
        # w = p_sel / s, s = Σ p_sel  =>  d p_sel = (dw - Σ dw·w) / s
        s = p.gather(1, idx).sum(-1, keepdim=True)
        dw = (dw - (dw * weights.to(p.dtype)).sum(-1, keepdim=True)) / s
    dp = torch.zeros_like(p).scatter(1, idx, dw)
    d_logits = p * (dp - (dp * p).sum(-1, keepdim=True))
    return d_logits.to(ctx.logits_dtype), None, None, None, None


_topk.register_autograd(_topk_backward, setup_context=_topk_setup)


def topk(router_logits, top_k, renormalize, selection_bias):
    """grove::topk on the backend configured for this thread."""
    _check_autodiff("grove::topk", router_logits, selection_bias)
    return _topk(router_logits, top_k, renormalize, selection_bias,
                 backends.resolve(router_logits))


# ---- experts (+ adjugates) -----------------------------------------------------------------

@torch.library.custom_op("grove::experts_forward", mutates_args=())
def experts_forward(hidden_states: Tensor, w1: Tensor, w2: Tensor, a1: Optional[Tensor],
                    a2: Optional[Tensor], topk_weights: Tensor, topk_ids: Tensor,
                    expert_map: Optional[Tensor], group_size: int, adjugate_scale: float,
                    weight_on_input: bool, save: bool = False,
                    backend: str = "auto",
                    layout: str = "sections") -> Tuple[Tensor, List[Tensor]]:
    # The stages in layer order, each file entered once: backend lookup, value checks, plan,
    # experts (docs/design.md §3.1).
    grove = a1 is not None
    _check_groups(w1, a1, group_size)
    stages = backends.get(backend, hidden_states, (w1, w2, a1, a2))
    _check_layout(layout, stages, grove)
    _check_values(topk_ids, w1.shape[0], expert_map, group_size, grove)
    skips = expert_map is not None or _unchecked(topk_ids)  # beside the checks: one visit
    if layout == "folded" and grove:
        plan = stages.build_folded_plan(topk_ids, topk_weights, w1.shape[0], group_size,
                                        adjugate_scale, expert_map)
    else:
        plan = stages.build_plan(topk_ids, topk_weights, w1.shape[0],
                                 group_size if grove else 0, adjugate_scale, expert_map)
    return experts_stage.forward(stages, hidden_states, Weights(w1, w2, a1, a2), plan,
                                 weight_on_input, save, skips=skips)


def _unchecked(topk_ids):
    # Ids no value check read (checks off, or a CUDA graph being captured) may lie out of
    # range: the plan skips their slots, leaving expert rows no GEMM writes.
    return not values.value_checks_enabled() or values.capturing(topk_ids)


@experts_forward.register_fake
def _(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
      adjugate_scale, weight_on_input, save=False, backend="auto", layout="sections"):
    saved = []
    if save:
        saved = experts_stage.saved_tensors(hidden_states.shape[0], topk_ids.shape[1],
                                             Weights(w1, w2, a1, a2), topk_weights.dtype,
                                             hidden_states.dtype, hidden_states.device, layout)
    return hidden_states.new_empty(hidden_states.shape), saved


@torch.library.custom_op("grove::experts_backward", mutates_args=())
def experts_backward(grad_out: Tensor, hidden_states: Tensor, w1: Tensor, w2: Tensor,
                     a1: Optional[Tensor], a2: Optional[Tensor], topk_weights: Tensor,
                     saved: List[Tensor], group_size: int, adjugate_scale: float,
                     weight_on_input: bool, backend: str,
                     layout: str = "sections") -> List[Tensor]:
    """[dx, dw1, dw2, da1, da2, d topk_weights]; da1/da2 are empty when a1/a2 are absent.
    saved: the `saved` of an experts_forward run with save=True on the same backend."""
    weights = Weights(w1, w2, a1, a2)
    T, k = topk_weights.shape
    plan, act = experts_stage.unflatten_saved(saved, T, k, weights, layout)
    return experts_stage.backward(backends.get(backend, hidden_states, weights), grad_out,
                                  hidden_states, weights, plan, act, weight_on_input,
                                  adjugate_scale, topk_weights.dtype)


@experts_backward.register_fake
def _(grad_out, hidden_states, w1, w2, a1, a2, topk_weights, saved, group_size, adjugate_scale,
      weight_on_input, backend, layout="sections"):
    # Contiguous like the real kernels' outputs, whatever the inputs' strides.
    return [hidden_states.new_empty(hidden_states.shape), w1.new_empty(w1.shape),
            w2.new_empty(w2.shape), a1.new_empty(a1.shape) if a1 is not None else w1.new_empty(0),
            a2.new_empty(a2.shape) if a2 is not None else w1.new_empty(0),
            topk_weights.new_empty(topk_weights.shape)]


# The arguments of grove::experts_forward, in schema order, and those that get a gradient (the
# order of experts_backward's list).
_FORWARD_ARGS = ("hidden_states", "w1", "w2", "a1", "a2", "topk_weights", "topk_ids",
                 "expert_map", "group_size", "adjugate_scale", "weight_on_input", "save",
                 "backend", "layout")
_GRAD_ARGS = ("hidden_states", "w1", "w2", "a1", "a2", "topk_weights")


def _experts_setup(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    args.setdefault("layout", "sections")  # torch leaves out trailing default arguments
    _, saved = output
    if not args["save"]:
        raise RuntimeError("grove::experts_forward: gradients need the activations; call it "
                           "with save=True (grove_kernels.ops.experts does)")
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(*(args[n] for n in _GRAD_ARGS), *saved)
    ctx.config = {n: args[n] for n in ("group_size", "adjugate_scale", "weight_on_input",
                                       "backend", "layout")}


def _experts_backward(ctx, grad_out, grad_saved):
    x, w1, w2, a1, a2, topk_weights, *saved = ctx.saved_tensors
    grads = experts_backward(grad_out, x, w1, w2, a1, a2, topk_weights, saved, **ctx.config)
    needed = dict(zip(_FORWARD_ARGS, ctx.needs_input_grad))
    named = {n: g for n, g in zip(_GRAD_ARGS, grads) if needed[n]}
    if a1 is None:  # a plain MoE: experts_backward's da1 / da2 are empty placeholders
        named.pop("a1", None)
        named.pop("a2", None)
    # One entry per input torch kept (it leaves out trailing arguments equal to their default).
    return tuple(named.get(n) for n in _FORWARD_ARGS[:len(ctx.needs_input_grad)])


experts_forward.register_autograd(_experts_backward, setup_context=_experts_setup)


def experts(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size, adjugate_scale,
            weight_on_input):
    """grove::experts_forward on the backend resolved for this call; it keeps what the
    backward needs when autograd will ask for one."""
    _check_autodiff("grove::experts_forward", x, w1, w2, a1, a2, topk_weights)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, w2, a1, a2, topk_weights))
    asked = backends.requested_layout() if a1 is not None else "sections"
    backend = backends.resolve(x, (w1, w2, a1, a2), training=save, top_k=topk_ids.shape[1],
                               layout=asked)
    layout = backends.layout(backend, asked)
    return experts_forward(x, w1, w2, a1, a2, topk_weights, topk_ids, expert_map, group_size,
                           adjugate_scale, weight_on_input, save, backend, layout)[0]
