"""Edge cases of the public API that once went wrong silently or blamed the wrong argument:
forward-mode AD and torch.func transforms (refused by name instead of zero tangents), a zero
hidden size, errors that name the argument actually at fault, and inplace=True on a tensor
autograd still needs. Every backend that runs on the CPU (triton under its interpreter).
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import grove_kernels as gk
from helpers import leaf, make_grove, routing

T, H, E, I, Ia, K, S = 6, 16, 8, 8, 4, 2, 2


def _layer(gen, dtype=torch.float32, T=T, H=H):
    p = make_grove(T, H, E, I, Ia, S, gen, dtype)
    w, ids = routing(T, E, K, gen)
    return p, w, ids.to(torch.int32)


def _grove(p, w, ids, x=None):
    return gk.fused_grove_experts(p["x"] if x is None else x, p["w1"], p["w2"], p["a1"],
                                  p["a2"], w, ids, group_size=S)


@pytest.mark.parametrize("transform", ["jvp", "grad", "vjp", "vmap"])
def test_torch_func_transforms_are_refused_by_name(backend, gen, transform):
    p, w, ids = _layer(gen)

    def f(x):
        return _grove(p, w, ids, x)

    x = p["x"]
    calls = {
        "jvp": lambda: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
        "grad": lambda: torch.func.grad(lambda t: f(t).sum())(x),
        "vjp": lambda: torch.func.vjp(f, x),
        "vmap": lambda: torch.func.vmap(f)(x[None]),
    }
    with pytest.raises(NotImplementedError, match="grove::experts_forward.*torch.func"):
        calls[transform]()
    logits = torch.randn(T, E, generator=gen)
    with pytest.raises(NotImplementedError, match="grove::topk"):
        torch.func.jvp(lambda t: gk.grove_topk(t, K)[0], (logits,), (torch.ones_like(logits),))


def test_forward_mode_ad_is_refused_by_name(backend, gen):
    p, w, ids = _layer(gen)
    with fwAD.dual_level():
        dual = fwAD.make_dual(p["x"], torch.ones_like(p["x"]))
        with pytest.raises(NotImplementedError, match="grove::experts_forward.*forward-mode"):
            _grove(p, w, ids, dual)
        # Plain tensors inside a dual level are fine: nothing has a tangent to lose.
        assert _grove(p, w, ids).shape == (T, H)


def test_zero_hidden_size(backend, layout, gen):
    _, w, ids = _layer(gen)
    p = dict(x=torch.randn(T, 0), w1=torch.randn(E, 2 * I, 0), w2=torch.randn(E, 0, I),
             a1=torch.randn(E // S, 2 * Ia, 0), a2=torch.randn(E // S, 0, Ia))
    leaves = {n: leaf(t) for n, t in p.items()}
    wl = leaf(w)
    y = gk.fused_grove_experts(leaves["x"], leaves["w1"], leaves["w2"], leaves["a1"],
                               leaves["a2"], wl, ids, group_size=S)
    assert y.shape == (T, 0)
    y.sum().backward()
    assert torch.equal(wl.grad, torch.zeros_like(w))  # d w = <dY, expert output> = 0
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves.values())


def test_wrong_hidden_size_names_hidden_states(backend, gen):
    p, w, ids = _layer(gen)
    with pytest.raises(ValueError, match="^hidden_states: expected hidden size 16"):
        _grove(p, w, ids, torch.randn(T, H + 1))


def test_weight_with_wrong_hidden_size_names_that_weight(backend, gen):
    p, w, ids = _layer(gen)
    p["w2"] = torch.randn(E, H + 1, I)
    with pytest.raises(ValueError, match="^w2:"):
        _grove(p, w, ids)


def test_wrong_topk_weights_shape_names_topk_weights(backend, gen):
    p, w, ids = _layer(gen)
    with pytest.raises(ValueError, match="^topk_weights:"):
        _grove(p, w[:, :1].contiguous(), ids)


def test_ids_out_of_range_name_topk_ids_only(backend, gen):
    p, w, ids = _layer(gen)
    ids[0, 0] = E
    with pytest.raises(IndexError, match="^topk_ids:") as info:
        _grove(p, w, ids)
    assert "top_k" not in str(info.value).replace("topk_ids", "")
    too_many = torch.arange(E + 1, dtype=torch.int32).repeat(T, 1) % E
    with pytest.raises(ValueError, match="^topk_ids:") as info:
        _grove(p, torch.ones(T, E + 1), too_many)
    assert "top_k" not in str(info.value).replace("topk_ids", "")


def test_inplace_into_a_tensor_autograd_needs_is_refused_at_the_call(backend, gen):
    p, w, ids = _layer(gen)
    x = leaf(p["x"]) * 1.0  # a non-leaf that requires grad
    with pytest.raises(ValueError, match="^inplace:"):
        gk.fused_experts(x, p["w1"], p["w2"], w, ids, inplace=True)
    with pytest.raises(ValueError, match="^inplace:"):
        gk.fused_moe(x, p["w1"], p["w2"], torch.randn(T, E), K, True, inplace=True)
    with torch.no_grad():  # nothing will need x: writing into it is fine
        y = gk.fused_experts(x, p["w1"], p["w2"], w, ids, inplace=True)
    assert y.data_ptr() == x.data_ptr()
