"""The custom ops as torch sees them: opcheck, torch.compile, determinism.

    torch.ops.grove.topk              logits [T,E] -> (w fp32 [T,k], ids int32 [T,k])
    torch.ops.grove.experts_forward   x, w1, w2, a1?, a2?, w, ids, expert_map?, ..., save, backend
                                      -> (y [T,H], saved)
    torch.ops.grove.experts_backward  dy + the forward's inputs + saved -> [dx, dw1, dw2, da1,
                                      da2, dw]

opcheck runs schema, fake-tensor, autograd-registration and aot-dispatch checks; the compile
tests trace gk.grove_moe / gk.fused_experts with fullgraph=True (no graph breaks allowed, so
value checks must stay inside the ops) and compare with eager, forward and backward.
"""
import pytest
import torch

import grove_kernels as gk
from helpers import (
    leaf,
    make_grove,
    randn,
    rel_err,
    router_logits,
    routing,
)

T, H, E, I, Ia, K, S = 13, 24, 8, 16, 8, 2, 2
LAM = 0.5


def _inputs(gen, dtype=torch.float32, T=T):
    p = make_grove(T, H, E, I, Ia, S, gen, dtype)
    w, ids = routing(T, E, K, gen)
    return p, w, ids.to(torch.int32)


# ----------------------------------------------------------------------------- opcheck


def test_ops_registered():
    for name in ("topk", "experts_forward", "experts_backward"):
        assert hasattr(torch.ops.grove, name), name


def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_topk(backend, gen, renormalize, bias):
    logits = leaf(router_logits(T, E, gen))
    b = torch.randn(E, generator=gen) * 0.3 if bias else None
    _opcheck(torch.ops.grove.topk.default, (logits, K, renormalize, b, backend))


def _experts_args(gen, variant, requires_grad, backend):
    p, w, ids = _inputs(gen)
    x, w1, w2, a1, a2 = p["x"], p["w1"], p["w2"], p["a1"], p["a2"]
    emap, group_size, lam, on_input = None, S, LAM, False
    if variant in ("plain", "expert_map", "weight_on_input"):
        a1 = a2 = None
        group_size, lam = 1, 0.0
    if variant == "expert_map":
        w1, w2 = w1[:4].contiguous(), w2[:4].contiguous()
        emap = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
    if variant == "weight_on_input":
        on_input = True
    if requires_grad:
        x, w1, w2, w = leaf(x), leaf(w1), leaf(w2), leaf(w)
        a1, a2 = (leaf(a1), leaf(a2)) if a1 is not None else (None, None)
    return [x, w1, w2, a1, a2, w, ids, emap, group_size, lam, on_input, requires_grad, backend]


VARIANTS = ["grove", "plain", "expert_map", "weight_on_input"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("save", [False, True], ids=["inference", "training"])
def test_opcheck_experts_forward(backend, gen, variant, save):
    _opcheck(torch.ops.grove.experts_forward.default, _experts_args(gen, variant, save, backend))


def _saved_shapes(T, k, E, G, I, Ia):
    ka, c = min(k, G), (2 * k if G else k)
    plan = [(T * (k + ka),), (T * (k + ka),), (E + 1,), (T, c), (T, c), (T, c)]
    plan += [(G + 1,), (T, k, k)] if G else []
    act = [(T * k, 2 * I), (T * k, I)] + ([(T * ka, 2 * Ia), (T * ka, Ia)] if G else [])
    return plan + act


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_forward_keeps_plan_and_activations(backend, gen, variant):
    """What a training forward saves has one backend-independent layout: the plan's tensors,
    then h and z of every row of each section; the autograd path asks for it."""
    args = _experts_args(gen, variant, True, backend)
    x, w1, a1, ids = args[0], args[1], args[3], args[6]
    y, saved = torch.ops.grove.experts_forward(*args)
    T, k, E, I = x.shape[0], ids.shape[1], w1.shape[0], w1.shape[1] // 2
    G, Ia = (a1.shape[0], a1.shape[1] // 2) if a1 is not None else (0, 0)
    assert [tuple(t.shape) for t in saved] == _saved_shapes(T, k, E, G, I, Ia)
    again = torch.ops.grove.experts_forward(*args)[1]
    assert all(torch.equal(a, b) for a, b in zip(saved, again))  # nothing left unwritten
    with torch.no_grad():
        _, no_saved = torch.ops.grove.experts_forward(*args[:-2], False, backend)
    assert no_saved == []


def test_training_calls_keep_what_the_backward_needs(backend, gen, monkeypatch):
    from grove_kernels import ops

    saves = []
    real = ops.experts_forward
    monkeypatch.setattr(ops, "experts_forward",
                        lambda *a: saves.append(a[11:14]) or real(*a))  # save, backend, layout
    x, w1, w2, a1, a2, w, ids = _experts_args(gen, "grove", True, backend)[:7]
    y = gk.fused_grove_experts(x, w1, w2, a1, a2, w, ids, group_size=S, adjugate_scale=LAM)
    y.sum().backward()
    from grove_kernels.backends import BACKENDS

    grove = BACKENDS[backend].default_layout  # GROVE_ADJUGATE_LAYOUT unset
    assert saves == [(True, backend, grove)] and x.grad is not None
    with torch.no_grad():
        gk.fused_grove_experts(x, w1, w2, a1, a2, w, ids, group_size=S, adjugate_scale=LAM)
    gk.fused_experts(x.detach(), w1.detach(), w2.detach(), w.detach(), ids)
    assert saves[1:] == [(False, backend, grove), (False, backend, "sections")]
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")  # read per call; plain calls: sections
    gk.fused_grove_experts(x, w1, w2, a1, a2, w, ids, group_size=S, adjugate_scale=LAM)
    gk.fused_experts(x.detach(), w1.detach(), w2.detach(), w.detach(), ids)
    assert [s[2] for s in saves[3:]] == ["folded", "sections"]


def test_gradients_need_the_saved_activations(backend, gen):
    args = _experts_args(gen, "grove", True, backend)
    with pytest.raises(RuntimeError, match="save=True"):
        torch.ops.grove.experts_forward(*args[:-2], False, backend)


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_experts_backward(backend, gen, variant):
    args = _experts_args(gen, variant, False, backend)
    args[-2] = True
    _, saved = torch.ops.grove.experts_forward(*args)
    dy = randn(T, H, gen=gen)
    x, w1, w2, a1, a2, w, _, _, group_size, lam, on_input, _, name = args
    _opcheck(torch.ops.grove.experts_backward.default,
             [dy, x, w1, w2, a1, a2, w, saved, group_size, lam, on_input, name])


def test_opcheck_empty_batch(backend, gen):
    p, w, ids = _inputs(gen, T=0)
    for save in (False, True):
        leaves = [leaf(t) if save else t for t in (p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w)]
        args = leaves + [ids, None, S, LAM, False, save, backend]
        _opcheck(torch.ops.grove.experts_forward.default, args)


# ----------------------------------------------------------------------------- torch.compile


def _grove_moe(x, logits, w1, w2, a1, a2, bias):
    return gk.grove_moe(x, logits, w1, w2, a1, a2, top_k=K, group_size=S, adjugate_scale=LAM,
                        selection_bias=bias)


def _fused_experts(x, w1, w2, w, ids):
    return gk.fused_experts(x, w1, w2, w, ids)


def _fused_experts_ep(x, w1, w2, w, ids, emap):
    return gk.fused_experts(x, w1[:4], w2[:4], w, ids, global_num_experts=E, expert_map=emap,
                            apply_router_weight_on_input=True)


def _compile_args(fn_name, gen, dtype):
    p, w, ids = _inputs(gen, dtype)
    if fn_name == "grove_moe":
        logits = router_logits(T, E, gen)
        return _grove_moe, [p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"],
                            torch.randn(E, generator=gen) * 0.3]
    if fn_name == "fused_experts":
        return _fused_experts, [p["x"], p["w1"], p["w2"], w, ids]
    emap = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
    return _fused_experts_ep, [p["x"], p["w1"], p["w2"], w[:, :1].contiguous(),
                               ids[:, :1].contiguous(), emap]


def _fwd_bwd(fn, args, dy):
    leaves = [leaf(a) if a.is_floating_point() and a.dim() > 1 else a for a in args]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [a.grad for a in leaves if a.is_floating_point() and a.dim() > 1]


@pytest.mark.toolchain  # torch.compile: Dynamo tracing, Inductor codegen
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn_name", ["grove_moe", "fused_experts", "fused_experts_ep"])
def test_compile_fullgraph(backend, gen, fn_name, dtype, compiler):
    torch._dynamo.reset()
    fn, args = _compile_args(fn_name, gen, dtype)
    dy = randn(T, H, gen=gen, dtype=dtype)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    y_c, g_c = _fwd_bwd(compiled, args, dy)
    y_e, g_e = _fwd_bwd(fn, args, dy)
    assert y_c.dtype == dtype
    assert rel_err(y_c, y_e) <= 1e-6
    assert len(g_c) == len(g_e) and all(g is not None for g in g_c)
    for i, (a, b) in enumerate(zip(g_c, g_e)):
        assert rel_err(a, b) <= 1e-6, f"grad {i}"


@pytest.mark.toolchain  # torch.compile: Dynamo tracing, Inductor codegen
def test_compile_dynamic_tokens(backend, gen):
    """One compiled graph serves several T (symbolic T through the fake kernels), T = 0 too."""
    torch._dynamo.reset()
    compiled = torch.compile(_fused_experts, fullgraph=True, backend="aot_eager", dynamic=True)
    for t in (5, 11, 0, 17):
        p, w, ids = _inputs(gen, T=t)
        args = [p["x"], p["w1"], p["w2"], w, ids]
        assert rel_err(compiled(*args), _fused_experts(*args)) <= 1e-6


@pytest.mark.toolchain  # torch.compile: Dynamo tracing, Inductor codegen
def test_compile_inductor(backend, gen):
    """The default compiler too (C++ codegen on the CPU), forward and backward."""
    torch._dynamo.reset()
    fn, args = _compile_args("grove_moe", gen, torch.float32)
    dy = randn(T, H, gen=gen)
    y_c, g_c = _fwd_bwd(torch.compile(fn, fullgraph=True), args, dy)
    y_e, g_e = _fwd_bwd(fn, args, dy)
    assert rel_err(y_c, y_e) <= 1e-6
    for i, (a, b) in enumerate(zip(g_c, g_e)):
        assert rel_err(a, b) <= 1e-6, f"grad {i}"


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn_name", ["grove_moe", "fused_experts", "fused_experts_ep"])
def test_deterministic(backend, gen, fn_name, dtype):
    fn, args = _compile_args(fn_name, gen, dtype)
    dy = randn(T, H, gen=gen, dtype=dtype)
    y1, g1 = _fwd_bwd(fn, args, dy)
    y2, g2 = _fwd_bwd(fn, args, dy)
    assert torch.equal(y1, y2)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert torch.equal(a, b), f"grad {i}"
