"""The experts stage around every backend: what a call hands a backend, what a training forward
saves for its backward, and the steps shared by all backends, written once.

    forward(backend, x [T, H], weights, plan, weight_on_input, save, skips)
        -> y [T, H], saved (the plan's tensors and the activations by name; only when save)
    backward(backend, dy [T, H], x, weights, plan, act, weight_on_input, adjugate_scale, w_dtype)
        -> dx [T, H], dw1, dw2, da1, da2, d topk_weights [T, k]

With the folded adjugate layout (a FoldedPlan, plan_folded.py) there are only expert rows
R = T*k and the activations are one buffer each, saved as "h" and "z": h [R, 2I + 2Ia] =
[gate_e | up_e | gate_a | up_a], z [R, I + Ia] = [z_e | z_a] (unscaled SwiGLU outputs; held as
Activations((h, None), (z, None))); the adjugate columns hold values on leader rows and zeros
on every other row. A backend's backward then returns the pair (d row weight [R], d leader
weight [R]).

Weights (w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H] | None, a2 [G, H, Ia] | None) come in two
*sections*, experts then adjugates, like the plan's rows. Activations are what a training
forward keeps per plan row of each section: GEMM-1's pre-activations h = [gate | up]
(he [R_e, 2I], ha [R_a, 2Ia]) and SwiGLU's outputs z (ze [R_e, I], za [R_a, Ia]); the same
layout on every backend, so the fake kernels and the backward never depend on who wrote it.

The experts stage of a backend (reference.py, triton/backend.py, cuda/backend.py; the backend
objects, with supports() and the routing and plan stages, are in backends.py):
    forward(x, weights, plan, weight_on_input, y, act)
        writes y; with act (a training forward) also act.h and act.z of every real row
    backward(dy, x, weights, plan, weight_on_input, act, grads) -> d row weight [R]
        writes every element of grads (Grads: dx, dw1, dw2, da1, da2; problems without rows:
        zeros)
x and dy are contiguous [T, H] in the input dtype with T >= 1 and H >= 1.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from .plan import Plan
from .plan_folded import FoldedPlan
from .routing import acc_dtype


class _WeightTensors(NamedTuple):
    w1: torch.Tensor
    w2: torch.Tensor
    a1: Optional[torch.Tensor]
    a2: Optional[torch.Tensor]


class Weights(_WeightTensors):
    """(w1, w2, a1, a2), unpacked like a tuple, with what every stage asks of them as plain
    attributes (reading one is not a call back into this module):
        grove          a1 is present (False: a plain MoE)
        intermediate   (I, Ia), the SwiGLU widths of the sections (Ia = 0 without adjugates)
    """

    def __new__(cls, w1, w2, a1=None, a2=None):
        self = super().__new__(cls, w1, w2, a1, a2)
        self.grove = a1 is not None
        self.intermediate = (w1.shape[1] // 2, a1.shape[1] // 2 if a1 is not None else 0)
        return self


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

    @staticmethod
    def names(grove):
        return ("he", "ze", "ha", "za") if grove else ("he", "ze")

    def named(self):
        """{name: tensor} of the activations present."""
        (he, ha), (ze, za) = self.h, self.z
        return {n: t for n, t in zip(("he", "ze", "ha", "za"), (he, ze, ha, za))
                if t is not None}

    @classmethod
    def from_named(cls, tensors):
        return cls((tensors["he"], tensors.get("ha")), (tensors["ze"], tensors.get("za")))

    def adjugate(self):
        """The adjugate section's tensors (none for a plain MoE)."""
        return [t for t in (self.h[1], self.z[1]) if t is not None]


class Grads(NamedTuple):
    """What a backend's backward writes: dx [T, H] and the weight gradients (da1 / da2 None
    for a plain MoE)."""
    dx: torch.Tensor
    dw1: torch.Tensor
    dw2: torch.Tensor
    da1: Optional[torch.Tensor]
    da2: Optional[torch.Tensor]

    def sections(self):
        """(dW1, dW2) of each section present: experts, then adjugates."""
        return [(self.dw1, self.dw2)] + ([(self.da1, self.da2)] if self.da1 is not None else [])


def _folded(grove, layout):
    return grove and layout == "folded"


def saved_names(grove, layout="sections"):
    """The names of a training forward's `saved` tensors, in the op's list order."""
    if _folded(grove, layout):
        return FoldedPlan.field_names(grove) + ("h", "z")
    return Plan.field_names(grove) + Activations.names(grove)


def flatten_saved(plan, act):
    """The op's `saved` list: the plan's tensors and the activations, by name."""
    if plan.layout == "folded":
        named = {**plan.named_tensors(), "h": act.h[0], "z": act.z[0]}
    else:
        named = {**plan.named_tensors(), **act.named()}
    return [named[n] for n in saved_names(plan.num_groups > 0, plan.layout)]


def unflatten_saved(saved, T, k, weights, layout="sections"):
    """(Plan, Activations) from a training forward's `saved`."""
    names = saved_names(weights.grove, layout)
    if len(saved) != len(names):
        raise ValueError(f"saved: expected the {len(names)} tensors {names}, got {len(saved)}")
    named = dict(zip(names, saved))
    E, G = weights.w1.shape[0], (weights.a1.shape[0] if weights.grove else 0)
    if _folded(weights.grove, layout):
        act = Activations((named["h"], None), (named["z"], None))
        return FoldedPlan.from_named(T, k, E, G, named), act
    return Plan.from_named(T, k, E, G, named), Activations.from_named(named)


def saved_tensors(T, k, weights, routing_dtype, dtype, device, layout="sections"):
    """Empty tensors shaped like a training forward's `saved` (the fake kernel's output)."""
    E, G = weights.w1.shape[0], (weights.a1.shape[0] if weights.grove else 0)
    cls = FoldedPlan if _folded(weights.grove, layout) else Plan
    plan = cls.empty(T, k, E, G, acc_dtype(routing_dtype), device)
    return flatten_saved(plan, Activations.empty(plan, weights, dtype, device))


def forward(backend, x, weights, plan, weight_on_input, save, skips):
    """y [T, H] and, when save, the `saved` list (plan tensors, then activations).

    skips: slots may map to no local expert (expert_map, or ids out of range that no value
    check caught), leaving expert rows unwritten."""
    T, H = x.shape
    y = x.new_empty(T, H)
    act = None
    if save:
        act = Activations.empty(plan, weights, x.dtype, x.device)
        # GEMM-1 never writes rows of no problem (the adjugate section's tail; expert rows of
        # skipped slots); an op output must not hold allocator leftovers.
        if plan.layout == "folded":  # nor the adjugate columns of rows that lead no group
            I = weights.intermediate[0]
            for t, cols in ((act.h[0], 2 * I), (act.z[0], I)):
                (t if skips else t[:, cols:]).zero_()
        else:
            for t in (act.named().values() if skips else act.adjugate()):
                t.zero_()
    if T and H:
        backend.forward(x.contiguous(), weights, plan, weight_on_input, y, act)
    elif H == 0 and act is not None:  # K = 0: h and z are zeros
        for t in act.named().values():
            t.zero_()
    return y, (flatten_saved(plan, act) if save else [])


def backward(backend, dy, x, weights, plan, act, weight_on_input, adjugate_scale, w_dtype):
    """[dx, dw1, dw2, da1, da2, d topk_weights]; da1 / da2 are empty when a1 / a2 are absent."""
    T, H = x.shape

    def absent():  # a fresh empty tensor each: op outputs must not alias one another
        return x.new_empty(0)

    if T == 0 or H == 0:  # nothing flows: every gradient is zero
        grads = [torch.zeros_like(t) if t is not None else absent() for t in (x,) + weights]
        return grads + [torch.zeros(T, plan.top_k, dtype=w_dtype, device=x.device)]
    # Contiguous, whatever the inputs' strides: kernels write gradients row-major
    # (empty_like would copy a transposed x's strides).
    grads = Grads(x.new_empty(T, H),
                  *(torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None
                    else None for t in weights))
    d_row_weight = backend.backward(dy.to(x.dtype).contiguous(), x.contiguous(), weights, plan,
                                    weight_on_input, act, grads)
    if plan.layout == "folded":  # (d row weight, d leader weight)
        d_topk = plan.topk_weight_grad(*d_row_weight, adjugate_scale).to(w_dtype)
    else:
        d_topk = plan.topk_weight_grad(d_row_weight, adjugate_scale).to(w_dtype)
    return [g if g is not None else absent() for g in grads] + [d_topk]


