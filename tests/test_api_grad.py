"""Gradients of the public API against autograd over the float64 oracle (docs/design.md §3, §5).

    fused_grove_experts  dy [T,H] -> dx, dw1, dw2, da1, da2, d topk_weights
    grove_moe            dy [T,H] -> dx, d router_logits [T,E], dw1, dw2, da1, da2
                         (the selection bias picks experts only: never a gradient)
    fused_experts        dy [T,H] -> dx, dw1, dw2, d topk_weights (weight on output or input)
    grove_topk           dw [T,k] -> d router_logits

Every gradient is compared tensor by tensor with ||g - g_ref|| / ||g_ref||, in fp32 and bf16
(fp16 on one case), with a random upstream gradient so no term can cancel by symmetry.
"""
import pytest
import torch

import grove_kernels as gk
import oracle
from helpers import (
    DTYPE_IDS,
    assert_close,
    backend_reference,
    leaf,
    make_grove,
    randn,
    router_logits,
    routing,
    to64,
)

LAM = 0.5
BASE = dict(T=37, H=40, E=8, I=24, Ia=8, k=2, S=2, kind="random")
GRAD_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                                      ids=DTYPE_IDS.get)
WEIGHTS = ("w1", "w2", "a1", "a2")


def _backward(fn, inputs, dy):
    """fn(**fresh leaves).backward(dy) -> (y, {name: grad})."""
    leaves = {n: leaf(t) for n, t in inputs.items()}
    y = fn(**leaves)
    y.backward(dy)
    return y, {n: t.grad for n, t in leaves.items()}


def _compare(grads, inputs, ref_leaves, dtype, torch_grads=None):
    for name, g in grads.items():
        assert g is not None, f"no gradient reached {name}"
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        torch_g = torch_grads[name] if torch_grads else None
        assert_close(g, ref_leaves[name].grad, f"d{name}", dtype=dtype, torch_out=torch_g)


# ----------------------------------------------------------------------------- grove experts

GROVE_CASES = {
    "base": {},
    "odd_sizes": dict(T=23, H=33, I=17, Ia=7),
    "T1": dict(T=1),
    "k1": dict(k=1),
    "S1": dict(S=1),
    "S4_k4": dict(S=4, k=4),
    "one_expert": dict(kind="one_expert"),
    "coselected": dict(kind="coselected"),
    "coselected_k4": dict(k=4, kind="coselected"),
    "sparse": dict(kind="sparse"),
}


@GRAD_DTYPES
@pytest.mark.parametrize("case", list(GROVE_CASES))
def test_fused_grove_experts_grad(backend, layout, gen, case, dtype):
    _grove_grad(backend, gen, {**BASE, **GROVE_CASES[case]}, dtype)


def test_fused_grove_experts_grad_fp16(backend, layout, gen):
    _grove_grad(backend, gen, {**BASE, **GROVE_CASES["coselected"]}, torch.float16)


def _grove_grad(backend, gen, c, dtype):
    T, H, S = c["T"], c["H"], c["S"]
    inputs = make_grove(T, H, c["E"], c["I"], c["Ia"], S, gen, dtype)
    w, ids = routing(T, c["E"], c["k"], gen, c["kind"], S)
    inputs["topk_weights"] = w
    dy = randn(T, H, gen=gen, dtype=dtype)

    def fn(x, w1, w2, a1, a2, topk_weights):
        return gk.fused_grove_experts(x, w1, w2, a1, a2, topk_weights, ids, group_size=S,
                                      adjugate_scale=LAM)

    def run():
        return _backward(fn, inputs, dy)

    y, grads = run()
    assert grads["topk_weights"].dtype == torch.float32
    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.grove_layer(ref["x"], ref["w1"], ref["w2"], ref["a1"], ref["a2"],
                               ref["topk_weights"], ids, S, LAM)
    y_ref.backward(to64(dy))
    assert_close(y, y_ref, "y", dtype=dtype)
    torch_run = backend_reference(run, backend)
    _compare(grads, inputs, ref, dtype, torch_run[1] if torch_run else None)


# ----------------------------------------------------------------------------- grove_moe

MOE_CASES = {
    "base": {},
    "k1": dict(k=1),
    "S4_k4": dict(S=4, k=4),
    "no_renorm": dict(renormalize=False),
    "bias": dict(bias=True),
    "bias_no_renorm": dict(bias=True, renormalize=False),
}


@GRAD_DTYPES
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_grove_moe_grad(backend, layout, gen, case, dtype):
    c = {**BASE, "renormalize": True, "bias": False, **MOE_CASES[case]}
    T, H, E, S, k = c["T"], c["H"], c["E"], c["S"], c["k"]
    inputs = make_grove(T, H, E, c["I"], c["Ia"], S, gen, dtype)
    inputs["router_logits"] = router_logits(T, E, gen, dtype)
    bias = torch.randn(E, generator=gen) * 0.3 if c["bias"] else None
    dy = randn(T, H, gen=gen, dtype=dtype)

    def fn(x, router_logits, w1, w2, a1, a2):
        return gk.grove_moe(x, router_logits, w1, w2, a1, a2, top_k=k, group_size=S,
                            adjugate_scale=LAM, renormalize=c["renormalize"],
                            selection_bias=bias)

    def run():
        return _backward(fn, inputs, dy)

    y, grads = run()
    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.grove_moe(ref["x"], ref["router_logits"], ref["w1"], ref["w2"], ref["a1"],
                             ref["a2"], k, S, LAM, c["renormalize"], to64(bias))
    y_ref.backward(to64(dy))
    assert_close(y, y_ref, "y", dtype=dtype)
    torch_run = backend_reference(run, backend)
    _compare(grads, inputs, ref, dtype, torch_run[1] if torch_run else None)


def test_selection_bias_gets_no_gradient(backend, layout, gen):
    """A bias that requires grad is a selection input only: no gradient, logits' still right."""
    T, E, k, S = 29, 8, 2, 2
    p = make_grove(T, 40, E, 24, 8, S, gen)
    logits = leaf(router_logits(T, E, gen))
    bias = leaf(torch.randn(E, generator=gen) * 0.3)
    y = gk.grove_moe(p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=k,
                     adjugate_scale=LAM, selection_bias=bias)
    dy = randn(T, 40, gen=gen)
    y.backward(dy)
    assert bias.grad is None or torch.count_nonzero(bias.grad) == 0
    ref_logits = to64(logits, requires_grad=True)
    y_ref = oracle.grove_moe(to64(p["x"]), ref_logits, to64(p["w1"]), to64(p["w2"]),
                             to64(p["a1"]), to64(p["a2"]), k, S, LAM, True, to64(bias))
    y_ref.backward(to64(dy))
    assert_close(logits.grad, ref_logits.grad, "d router_logits")

    bias.grad = None
    w, _ = gk.grove_topk(logits.detach(), k, selection_bias=bias)
    if w.requires_grad:  # autograd may mark it; the bias must still receive nothing
        w.backward(torch.randn(w.shape, generator=gen))
        assert bias.grad is None or torch.count_nonzero(bias.grad) == 0


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_grove_topk_grad(backend, gen, renormalize, with_bias):
    T, E, k = 33, 8, 3
    logits = leaf(router_logits(T, E, gen))
    bias = torch.randn(E, generator=gen) * 0.3 if with_bias else None
    w, ids = gk.grove_topk(logits, k, renormalize=renormalize, selection_bias=bias)
    ref_logits = to64(logits, requires_grad=True)
    w_ref, ids_ref = oracle.grove_topk(ref_logits, k, renormalize, to64(bias))
    # Upstream gradient attached to expert ids, so it does not depend on the slot order.
    per_expert = torch.randn(T, E, generator=gen)
    w.backward(per_expert.gather(1, ids.long()))
    w_ref.backward(to64(per_expert).gather(1, ids_ref))
    assert_close(logits.grad, ref_logits.grad, "d router_logits")


# ----------------------------------------------------------------------------- fused_experts

FUSED_CASES = {
    "base": dict(),
    "odd_sizes": dict(T=23, H=33, I=17),
    "k1": dict(k=1),
    "k4": dict(k=4),
    "weight_on_input_k1": dict(k=1, on_input=True),
    "weight_on_input_k2": dict(k=2, on_input=True),
    "expert_map": dict(expert_map=True),
    "expert_map_on_input": dict(k=1, expert_map=True, on_input=True),
}


@GRAD_DTYPES
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_experts_grad(backend, gen, case, dtype):
    c = {**BASE, "on_input": False, "expert_map": False, **FUSED_CASES[case]}
    T, H, k = c["T"], c["H"], c["k"]
    emap = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32) \
        if c["expert_map"] else None
    E_local = 4 if c["expert_map"] else c["E"]
    p = make_grove(T, H, E_local, c["I"], c["Ia"], 2, gen, dtype)
    inputs = {n: p[n] for n in ("x", "w1", "w2")}
    inputs["topk_weights"], ids = routing(T, c["E"], k, gen)
    dy = randn(T, H, gen=gen, dtype=dtype)
    extra = dict(global_num_experts=c["E"], expert_map=emap) if emap is not None else {}

    def fn(x, w1, w2, topk_weights):
        return gk.fused_experts(x, w1, w2, topk_weights, ids,
                                apply_router_weight_on_input=c["on_input"], **extra)

    def run():
        return _backward(fn, inputs, dy)

    y, grads = run()
    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.fused_experts(ref["x"], ref["w1"], ref["w2"], ref["topk_weights"], ids,
                                 apply_router_weight_on_input=c["on_input"], expert_map=emap)
    y_ref.backward(to64(dy))
    assert_close(y, y_ref, "y", dtype=dtype)
    torch_run = backend_reference(run, backend)
    _compare(grads, inputs, ref, dtype, torch_run[1] if torch_run else None)
    if emap is not None:  # slots on other ranks contribute nothing, so get exactly 0
        off = emap.long()[ids] < 0
        assert torch.all(grads["topk_weights"][off] == 0)


# ----------------------------------------------------------------------------- T = 0


@pytest.mark.parametrize("fn_name", ["fused_grove_experts", "grove_moe", "fused_experts"])
def test_empty_batch_backward(backend, layout, gen, fn_name):
    H, E = 40, 8
    p = {n: leaf(t) for n, t in make_grove(0, H, E, 24, 8, 2, gen).items()}
    w, ids = routing(0, E, 2, gen)
    w = leaf(w)
    logits = leaf(router_logits(0, E, gen))
    if fn_name == "fused_grove_experts":
        y = gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids)
        leaves = dict(p, topk_weights=w)
    elif fn_name == "grove_moe":
        y = gk.grove_moe(p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=2)
        leaves = dict(p, router_logits=logits)
    else:
        y = gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids)
        leaves = dict(x=p["x"], w1=p["w1"], w2=p["w2"], topk_weights=w)
    assert y.shape == (0, H) and y.requires_grad
    y.sum().backward()
    assert p["x"].grad is not None and p["x"].grad.shape == (0, H)
    for name, t in leaves.items():
        assert t.grad is None or (t.grad.shape == t.shape and torch.all(t.grad == 0)), name


# ----------------------------------------------------------------------------- expert parallel

@GRAD_DTYPES
@pytest.mark.parametrize("k", [2, 3])
def test_fused_grove_experts_expert_map_grad(backend, layout, gen, k, dtype):
    """Groups 1 and 3 of 4 on this rank (local experts 0..3): slots of the others are skipped.
    A skipped slot is, for the oracle, local expert 0 with weight 0 (it adds 0 to its term and
    to its group's weight), so every value and gradient but its own d topk_weights is equal."""
    T, H, I, Ia, S, E_global = 23, 24, 12, 6, 2, 8
    emap = torch.tensor([-1, -1, 0, 1, -1, -1, 2, 3], dtype=torch.int32)
    inputs = make_grove(T, H, 4, I, Ia, S, gen, dtype)
    w, ids = routing(T, E_global, k, gen)
    inputs["topk_weights"] = w
    dy = randn(T, H, gen=gen, dtype=dtype)

    def fn(x, w1, w2, a1, a2, topk_weights):
        return gk.fused_grove_experts(x, w1, w2, a1, a2, topk_weights, ids, group_size=S,
                                      adjugate_scale=LAM, expert_map=emap)

    def run():
        return _backward(fn, inputs, dy)

    y, grads = run()
    local = emap.long()[ids]
    off = local < 0
    assert off.any() and not off.all(dim=1).all()
    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.grove_layer(ref["x"], ref["w1"], ref["w2"], ref["a1"], ref["a2"],
                               ref["topk_weights"] * (~off), local.clamp(min=0), S, LAM)
    y_ref.backward(to64(dy))
    assert_close(y, y_ref, "y", dtype=dtype)
    assert torch.all(grads["topk_weights"][off] == 0)
    ref["topk_weights"].grad[off] = 0
    torch_run = backend_reference(run, backend)
    _compare(grads, inputs, ref, dtype, torch_run[1] if torch_run else None)
