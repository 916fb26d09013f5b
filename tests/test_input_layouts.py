"""Inputs in any memory layout and the errors around them, as fixed regression cases (the
property test, test_property.py, draws such cases at random):

    a transposed hidden_states: the gradient of x equals that of its contiguous copy
    I = 1 with Ia >= 2 (the down projections' unit strides differ between the sections)
    inplace into an expanded view or into a tensor the backward needs: refused at the call
    a float32 GroveMoE given float64 input; w1 passed as [E, H, 2I]: errors naming them
    a training forward with value checks off and out-of-range ids: saved activations hold
    zeros, never allocator leftovers
"""
import pytest
import torch

import grove_kernels as gk
import oracle
from grove_kernels import ops
from grove_kernels._validate import value_checks
from helpers import make_grove, rel_err, to64


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    fn(*leaves).pow(2).sum().backward()
    return [t.grad for t in leaves]


def test_transposed_hidden_states_gradient(backend):
    torch.manual_seed(0)
    xt = torch.randn(8, 3, requires_grad=True)
    w1, w2 = torch.randn(2, 8, 8) / 3, torch.randn(2, 8, 4) / 2
    ids, w = torch.tensor([[0], [1], [0]], dtype=torch.int32), torch.ones(3, 1)
    gk.fused_experts(xt.t(), w1, w2, w, ids).sum().backward()
    xc = xt.detach().t().contiguous().requires_grad_()
    gk.fused_experts(xc, w1, w2, w, ids).sum().backward()
    assert torch.isfinite(xt.grad).all()
    assert torch.allclose(xt.grad.t(), xc.grad, rtol=1e-5, atol=1e-6)


def test_transposed_hidden_states_reach_every_entry_point(backend, gen):
    p = make_grove(5, 8, 4, 4, 2, 2, gen)
    logits = torch.randn(5, 4, generator=gen)
    x_t = p["x"].t().contiguous()  # [H, T]: its .t() is the transposed view

    def grove_moe(x):
        return gk.grove_moe(x.t(), logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=2)

    def fused_moe(x):
        return gk.fused_moe(x.t(), p["w1"], p["w2"], logits, 2, True)

    def fused_moe_mapped(x):  # expert_map: experts 1 and 3 off this rank
        emap = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
        return gk.fused_moe(x.t(), p["w1"][:2], p["w2"][:2], logits, 2, True,
                            expert_map=emap)

    for fn in (grove_moe, fused_moe, fused_moe_mapped):
        (got,) = _grads(fn, x_t)
        (want,) = _grads(lambda x: fn(x.t().contiguous().t()), x_t)
        assert rel_err(got, want) <= 1e-5, fn.__name__

    layer = gk.GroveMoE(8, 4, 4, 2, 2, 2)
    x = torch.randn(8, 5, generator=gen, requires_grad=True)
    layer(x.t()).pow(2).sum().backward()
    x2 = x.detach().t().contiguous().requires_grad_()
    layer(x2).pow(2).sum().backward()
    assert rel_err(x.grad.t(), x2.grad) <= 1e-5


@pytest.mark.parametrize("I, Ia", [(1, 2), (1, 3), (2, 1), (1, 1)])
def test_unit_intermediate_sizes(backend, gen, I, Ia):
    T, H, E, S, k = 5, 8, 4, 2, 2
    p = make_grove(T, H, E, I, Ia, S, gen)
    w = torch.rand(T, k, generator=gen) + 0.1
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :k]
    args = [p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w]

    def fn(x, w1, w2, a1, a2, tw):
        return gk.fused_grove_experts(x, w1, w2, a1, a2, tw, ids, group_size=S,
                                      adjugate_scale=0.3)

    def ref(x, w1, w2, a1, a2, tw):
        return oracle.grove_layer(x, w1, w2, a1, a2, tw, ids, S, 0.3)

    got = _grads(fn, *args)
    want = _grads(ref, *[to64(t) for t in args])
    for name, g, r in zip(("x", "w1", "w2", "a1", "a2", "topk_weights"), got, want):
        assert rel_err(g, r) <= 1e-4, name


def test_inplace_refusals(backend, gen):
    p = make_grove(4, 8, 4, 4, 2, 2, gen)
    w = torch.rand(4, 1, generator=gen)
    ids = torch.zeros(4, 1, dtype=torch.int32)
    row = torch.randn(1, 8, generator=gen)
    with pytest.raises(ValueError, match="^inplace: hidden_states is an expanded view"):
        gk.fused_experts(row.expand(4, 8), p["w1"], p["w2"], w, ids, inplace=True)
    w1 = p["w1"].clone().requires_grad_()
    x = p["x"].clone()
    with pytest.raises(ValueError, match="^inplace: w1 requires grad"):
        gk.fused_experts(x, w1, p["w2"], w, ids, inplace=True)
    gating = torch.randn(4, 4, generator=gen, requires_grad=True)
    with pytest.raises(ValueError, match="^inplace: gating_output requires grad"):
        gk.fused_moe(x, p["w1"], p["w2"], gating, 2, True, inplace=True)
    assert torch.equal(x, p["x"])  # refused before anything was written
    with torch.no_grad():  # no backward will run: allowed
        y = gk.fused_experts(x, w1, p["w2"], w, ids, inplace=True)
    assert y is x


def test_grove_moe_module_names_a_dtype_mismatch():
    layer = gk.GroveMoE(8, 4, 4, 2, 2, 2)
    with pytest.raises(TypeError, match="^hidden_states: expected dtype torch.float32"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="^hidden_states: expected a torch.Tensor"):
        layer([[0.0] * 8])


def test_w1_in_the_wrong_layout_names_its_expected_shape():
    x, w2 = torch.randn(3, 8), torch.randn(4, 8, 5)
    w1 = torch.randn(4, 8, 10)  # [E, H, 2I] instead of [E, 2I, H]
    with pytest.raises(ValueError, match=r"^w1: expected shape \(4, 10, 8\)"):
        gk.fused_experts(x, w1, w2, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int32))


@pytest.mark.parametrize("grove", [False, True])
def test_saved_activations_hold_no_leftovers(backend, gen, grove):
    """Value checks off, an id out of range: its slot is skipped, and the rows no GEMM wrote
    are zeros (allocations are poisoned with NaN here, so leftovers would show)."""
    T, H, E, I, Ia, S, k = 4, 8, 4, 4, 2, 2, 2
    p = make_grove(T, H, E, I, Ia, S, gen)
    w = torch.rand(T, k, generator=gen) + 0.1
    ids = torch.tensor([[0, 1], [2, 9], [3, 0], [1, 2]], dtype=torch.int32)
    a1, a2 = (p["a1"], p["a2"]) if grove else (None, None)
    det = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        with value_checks(False):
            y, saved = ops.experts_forward(p["x"], p["w1"], p["w2"], a1, a2, w, ids, None,
                                           S if grove else 1, 0.05, False, True, backend)
    finally:
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert torch.isfinite(y).all()
    for t in saved:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), t.shape
