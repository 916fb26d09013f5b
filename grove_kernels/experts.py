"""The experts stage around every backend: what a call hands a backend, what a training forward
saves for its backward, and the steps shared by all backends, written once.

    forward(impl, x [T, H], weights, plan, weight_on_input, save, skips)
        -> y [T, H], saved = plan.tensors() + act.tensors()          (saved only when save)
    backward(impl, dy [T, H], x, weights, plan, act, weight_on_input, adjugate_scale, w_dtype)
        -> dx [T, H], dw1, dw2, da1, da2, d topk_weights [T, k]

With the folded adjugate layout (a FoldedPlan, plan_folded.py) there are only expert rows
R = T*k and the activations are one buffer each: h [R, 2I + 2Ia] = [gate_e | up_e | gate_a |
up_a], z [R, I + Ia] = [z_e | z_a] (unscaled SwiGLU outputs); the adjugate columns hold values
on leader rows and zeros on every other row. A backend's backward then returns the pair
(d row weight [R], d leader weight [R]).

Weights (w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H] | None, a2 [G, H, Ia] | None) come in two
*sections*, experts then adjugates, like the plan's rows. Activations are what a training
forward keeps per plan row of each section: GEMM-1's pre-activations h = [gate | up]
(he [R_e, 2I], ha [R_a, 2Ia]) and SwiGLU's outputs z (ze [R_e, I], za [R_a, Ia]); the same
layout on every backend, so the fake kernels and the backward never depend on who wrote it.

The backend protocol (reference.py, triton/backend.py, cuda/backend.py):
    supports(x, weights) -> None, or the reason it cannot run this call (naming the argument)
    forward(x, weights, plan, weight_on_input, y, act)
        writes y; with act (a training forward) also act.h and act.z of every real row
    backward(dy, x, weights, plan, weight_on_input, act, grads) -> d row weight [R]
        writes every element of grads (dx, dw1, dw2, da1, da2; problems without rows: zeros)
x and dy are contiguous [T, H] in the input dtype with T >= 1 and H >= 1.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from .plan import Plan


class Weights(NamedTuple):
    w1: torch.Tensor
    w2: torch.Tensor
    a1: Optional[torch.Tensor]
    a2: Optional[torch.Tensor]

    @property
    def grove(self):
        return self.a1 is not None

    @property
    def intermediate(self):
        """(I, Ia): the SwiGLU widths of the sections (Ia = 0 without adjugates)."""
        return self.w1.shape[1] // 2, (self.a1.shape[1] // 2 if self.grove else 0)

    def sections(self):
        """(W1, W2) of each section present: experts, then adjugates."""
        return [(self.w1, self.w2)] + ([(self.a1, self.a2)] if self.grove else [])


class Activations(NamedTuple):
    h: Tuple[torch.Tensor, Optional[torch.Tensor]]  # (he [R_e, 2I], ha [R_a, 2Ia])
    z: Tuple[torch.Tensor, Optional[torch.Tensor]]  # (ze [R_e, I], za [R_a, Ia])

    @classmethod
    def empty(cls, plan, weights, dtype, device):
        I, Ia = weights.intermediate
        if plan.layout == "folded":
            R = plan.num_rows
            return cls((torch.empty(R, 2 * (I + Ia), dtype=dtype, device=device), None),
                       (torch.empty(R, I + Ia, dtype=dtype, device=device), None))
        Re, Ra = plan.num_expert_rows, plan.num_adjugate_rows
        new = lambda rows, cols: torch.empty(rows, cols, dtype=dtype, device=device)  # noqa: E731
        if not weights.grove:
            return cls((new(Re, 2 * I), None), (new(Re, I), None))
        return cls((new(Re, 2 * I), new(Ra, 2 * Ia)), (new(Re, I), new(Ra, Ia)))

    def tensors(self):
        return [t for pair in zip(self.h, self.z) for t in pair if t is not None]

    @classmethod
    def from_tensors(cls, tensors):
        if len(tensors) == 2:
            return cls((tensors[0], None), (tensors[1], None))
        he, ze, ha, za = tensors
        return cls((he, ha), (ze, za))


def _plan_class(layout, weights):
    if layout == "folded" and weights.grove:
        from .plan_folded import FoldedPlan
        return FoldedPlan
    return Plan


def saved_tensors(T, k, weights, routing_dtype, dtype, device, layout="sections"):
    """Empty tensors shaped like a training forward's `saved` (the fake kernel's output)."""
    E, G = weights.w1.shape[0], (weights.a1.shape[0] if weights.grove else 0)
    plan = _plan_class(layout, weights).empty(T, k, E, G, Plan.weight_dtype(routing_dtype),
                                              device)
    return plan.tensors() + Activations.empty(plan, weights, dtype, device).tensors()


def split_saved(saved, T, k, weights, layout="sections"):
    """(Plan, Activations) from a training forward's `saved`."""
    E, G = weights.w1.shape[0], (weights.a1.shape[0] if weights.grove else 0)
    cls = _plan_class(layout, weights)
    n = len(saved) - (4 if weights.grove and cls is Plan else 2)
    return cls.from_tensors(T, k, E, G, saved[:n]), Activations.from_tensors(saved[n:])


def forward(impl, x, weights, plan, weight_on_input, save, skips):
    """y [T, H] and, when save, the `saved` list (plan tensors, then activations).

    skips: slots may map to no local expert (expert_map), leaving expert rows unwritten."""
    T, H = x.shape
    y = x.new_empty(T, H)
    act = None
    if save:
        act = Activations.empty(plan, weights, x.dtype, x.device)
        # GEMM-1 never writes rows of no problem (the adjugate section's tail; expert rows of
        # skipped slots); an op output must not hold allocator leftovers.
        if plan.layout == "folded":
            # Nor the adjugate columns of rows that lead no group.
            I = weights.intermediate[0]
            h, z = act.tensors()
            for t, cols in ((h, 2 * I), (z, I)):
                (t if skips else t[:, cols:]).zero_()
        else:
            for t in act.tensors()[(0 if skips else 2):]:
                t.zero_()
    if T and H:
        impl.forward(x.contiguous(), weights, plan, weight_on_input, y, act)
    elif H == 0 and act is not None:  # K = 0: h and z are zeros
        for t in act.tensors():
            t.zero_()
    saved = plan.tensors() + act.tensors() if save else []
    return y, saved


def backward(impl, dy, x, weights, plan, act, weight_on_input, adjugate_scale, w_dtype):
    """[dx, dw1, dw2, da1, da2, d topk_weights]; da1 / da2 are empty when a1 / a2 are absent."""
    w1, w2, a1, a2 = weights
    T, H = x.shape
    if T == 0 or H == 0:  # nothing flows: every gradient is zero
        grads = [torch.zeros_like(t) for t in (x, w1, w2)]
        grads += [torch.zeros_like(t) if t is not None else w1.new_empty(0) for t in (a1, a2)]
        return grads + [torch.zeros(T, plan.top_k, dtype=w_dtype, device=x.device)]
    grads = Weights(*(torch.empty_like(t) if t is not None else None for t in weights))
    dx = torch.empty_like(x)
    d_row_weight = impl.backward(dy.to(x.dtype).contiguous(), x.contiguous(), weights, plan,
                                 weight_on_input, act, (dx,) + tuple(grads))
    if plan.layout == "folded":  # (d row weight, d leader weight)
        d_topk = plan.topk_weight_grad(*d_row_weight, adjugate_scale).to(w_dtype)
    else:
        d_topk = plan.topk_weight_grad(d_row_weight, adjugate_scale).to(w_dtype)
    return [dx] + [g if g is not None else w1.new_empty(0) for g in grads] + [d_topk]


def unsupported(backend, x, weights, dtypes, multiple_of=1):
    """The common part of a backend's supports(): the reason a kernel backend cannot run a
    call with x's dtype, non-contiguous weights (kernels bake the unit stride of their last
    dimension into their loads) or sizes H, I, Ia not multiples of `multiple_of`; or None."""
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return (f"hidden_states: the {backend} backend supports {names}, got "
                f"{str(x.dtype).replace('torch.', '')}")
    for name, w in zip(("w1", "w2", "a1", "a2"), weights):
        if w is not None and not w.is_contiguous():
            return (f"{name}: the {backend} backend needs contiguous weights, got strides "
                    f"{w.stride()}")
    if multiple_of > 1 and weights[0] is not None:
        sizes = {"H": x.shape[1], "I": weights[0].shape[1] // 2}
        if weights[2] is not None:
            sizes["Ia"] = weights[2].shape[1] // 2
        odd = {k: v for k, v in sizes.items() if v % multiple_of}
        if odd:
            return (f"w1: the {backend} backend needs H, I and Ia multiples of {multiple_of}, "
                    f"got {odd}")
    return None
