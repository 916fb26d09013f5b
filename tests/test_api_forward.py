"""Forward values of the public API against the float64 oracle (docs/design.md §2, §5), every
backend.

    fused_grove_experts(x [T,H], w1 [E,2I,H], w2 [E,H,I], a1 [G,2Ia,H], a2 [G,H,Ia],
                        w [T,k], ids [T,k]) -> y [T,H]
    grove_moe(x, logits [T,E], ...)          -> y [T,H]   (grove_topk + fused_grove_experts)
    grove_topk(logits [T,E], k)              -> w fp32 [T,k], ids int32 [T,k]
    fused_experts / fused_moe / fused_topk   -> vLLM semantics (expert_map, weight on input,
                                                inplace, token_expert_indices = j*T + t)

Shapes are small (H ~ 40, E = 8, I ~ 24, Ia = 8, T <= 41) and deliberately not multiples of 16
where a case says so. The adjugate scale is 0.5 in most cases so that a wrong adjugate term
(computed twice for a co-selected group, wrong group, wrong weight) is far above tolerance.
"""
import pytest
import torch

import grove_kernels as gk
import oracle
from helpers import (
    DTYPE_IDS,
    FLOATS,
    assert_close,
    backend_reference,
    make_grove,
    rel_err,
    router_logits,
    routing,
    sorted_routing,
    to64,
)

LAM = 0.5
BASE = dict(T=37, H=40, E=8, I=24, Ia=8, k=2, S=2, kind="random")
GROVE_CASES = {
    "base": {},
    "T1": dict(T=1),
    "odd_sizes": dict(T=23, H=33, I=17, Ia=7),
    "k1": dict(k=1),
    "S1": dict(S=1),
    "S4_k2": dict(S=4),
    "S4_k4": dict(S=4, k=4),
    "k_all": dict(k=8, T=13),
    "one_expert_k1": dict(k=1, kind="one_expert"),
    "one_expert": dict(kind="one_expert"),
    "coselected": dict(kind="coselected"),
    "coselected_S4": dict(S=4, k=4, kind="coselected"),
    "coselected_k4": dict(k=4, kind="coselected"),
    "sparse": dict(kind="sparse", k=2),
}
DTYPES = pytest.mark.parametrize("dtype", FLOATS, ids=DTYPE_IDS.get)


def _case(name):
    return {**BASE, **GROVE_CASES[name]}


def _grove_inputs(c, gen, dtype):
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype)
    w, ids = routing(c["T"], c["E"], c["k"], gen, c["kind"], c["S"])
    return p, w, ids


def _grove_oracle(p, w, ids, S, lam):
    return oracle.grove_layer(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(p["a1"]),
                              to64(p["a2"]), to64(w), ids.cpu(), S, lam)


# ----------------------------------------------------------------------------- grove experts


@DTYPES
@pytest.mark.parametrize("case", list(GROVE_CASES))
def test_fused_grove_experts(backend, layout, gen, case, dtype):
    c = _case(case)
    p, w, ids = _grove_inputs(c, gen, dtype)
    before = {n: t.clone() for n, t in p.items()}

    def call():
        return gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                                      group_size=c["S"], adjugate_scale=LAM)

    y = call()
    assert y.dtype == dtype and y.shape == (c["T"], c["H"])
    for n, t in p.items():  # not inplace: inputs untouched
        assert torch.equal(t, before[n]), n
    ref = _grove_oracle(p, w, ids, c["S"], LAM)
    assert_close(y, ref, "y", torch_out=backend_reference(call, backend))


def test_fused_grove_experts_default_scale(backend, layout, gen):
    """adjugate_scale defaults to 0.05 and group_size to 2 (docs/design.md §1)."""
    c = _case("coselected")
    p, w, ids = _grove_inputs(c, gen, torch.float32)
    y = gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids)
    assert_close(y, _grove_oracle(p, w, ids, 2, 0.05), "y")


def test_adjugate_matches_two_call_emulation(backend, layout, gen):
    """Co-selected experts of a group: one adjugate with the summed weight equals, by
    linearity, the released two-call emulation (adjugates as a second fused call with
    ids // S). An independent cross-check of the oracle; a double-counted adjugate
    (λ·Σw added once per slot) would miss both by ~λ.
    """
    c = _case("coselected")
    p, w, ids = _grove_inputs(c, gen, torch.float32)
    y = gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                               group_size=2, adjugate_scale=LAM)
    x64, w64 = to64(p["x"]), to64(w)
    two_call = oracle.fused_experts(x64, to64(p["w1"]), to64(p["w2"]), w64, ids) + \
        LAM * oracle.fused_experts(x64, to64(p["a1"]), to64(p["a2"]), w64, ids // 2)
    shared = _grove_oracle(p, w, ids, 2, LAM)
    assert rel_err(two_call, shared) <= 1e-12
    assert_close(y, two_call, "y")


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_topk_ids_dtypes(backend, gen, id_dtype):
    c = _case("base")
    p, w, ids = _grove_inputs(c, gen, torch.float32)
    y = gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w,
                               ids.to(id_dtype), group_size=2, adjugate_scale=LAM)
    assert_close(y, _grove_oracle(p, w, ids, 2, LAM), "y")
    y2 = gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids.to(id_dtype))
    ref = oracle.fused_experts(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(w), ids)
    assert_close(y2, ref, "fused_experts y")


# ----------------------------------------------------------------------------- routing


@DTYPES
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (1, 8, 1), (23, 8, 8), (29, 16, 4)])
def test_grove_topk(backend, gen, T, E, k, renormalize, dtype):
    logits = router_logits(T, E, gen, dtype)
    w, ids = gk.grove_topk(logits, k, renormalize=renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == (T, k) and ids.shape == (T, k)
    ref_w, ref_ids = oracle.grove_topk(to64(logits), k, renormalize)
    got_w, got_ids = sorted_routing(w, ids)
    ref_w, ref_ids = sorted_routing(ref_w, ref_ids)
    assert torch.equal(got_ids, ref_ids)
    assert_close(got_w, ref_w, "topk_weights", dtype=torch.float32)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
def test_grove_topk_selection_bias(backend, gen, renormalize):
    """The bias moves the selection (sigmoid + b) but the weights stay softmax(l)[ids]."""
    T, E, k = 41, 8, 2
    logits = router_logits(T, E, gen)
    bias = torch.randn(E, generator=gen) * 0.3
    w, ids = gk.grove_topk(logits, k, renormalize=renormalize, selection_bias=bias)
    ref_w, ref_ids = oracle.grove_topk(to64(logits), k, renormalize, to64(bias))
    _, unbiased_ids = oracle.grove_topk(to64(logits), k, renormalize)
    assert not torch.equal(sorted_routing(ref_w, ref_ids)[1],
                           sorted_routing(ref_w, unbiased_ids)[1])  # the bias matters here
    got_w, got_ids = sorted_routing(w, ids)
    ref_w, ref_ids = sorted_routing(ref_w, ref_ids)
    assert torch.equal(got_ids, ref_ids)
    assert_close(got_w, ref_w, "topk_weights", dtype=torch.float32)


@DTYPES
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
@pytest.mark.parametrize("T,k", [(37, 2), (1, 1), (19, 8)])
def test_fused_topk(backend, gen, T, k, renormalize, dtype):
    E = 8
    x = torch.randn(T, 40, generator=gen).to(dtype)
    gating = router_logits(T, E, gen, dtype)
    w, ids, tei = gk.fused_topk(x, gating, k, renormalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and tei.dtype == torch.int32
    assert w.shape == ids.shape == tei.shape == (T, k)
    ref_w, ref_ids, ref_tei = oracle.fused_topk(to64(gating), k, renormalize)
    assert torch.equal(tei.long(), ref_tei)
    got_w, got_ids = sorted_routing(w, ids)
    ref_w, ref_ids = sorted_routing(ref_w, ref_ids)
    assert torch.equal(got_ids, ref_ids)
    assert_close(got_w, ref_w, "topk_weights", dtype=torch.float32)


# ----------------------------------------------------------------------------- grove_moe

MOE_CASES = {
    "base": {},
    "odd_sizes": dict(T=23, H=33, I=17, Ia=7),
    "k1": dict(k=1),
    "S1": dict(S=1),
    "S4_k4": dict(S=4, k=4),
    "no_renorm": dict(renormalize=False),
    "bias": dict(bias=True),
    "bias_no_renorm": dict(bias=True, renormalize=False),
}


@DTYPES
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_grove_moe(backend, layout, gen, case, dtype):
    c = {**BASE, "renormalize": True, "bias": False, **MOE_CASES[case]}
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype)
    logits = router_logits(c["T"], c["E"], gen, dtype)
    bias = torch.randn(c["E"], generator=gen) * 0.3 if c["bias"] else None

    def call():
        return gk.grove_moe(p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=c["k"],
                            group_size=c["S"], adjugate_scale=LAM,
                            renormalize=c["renormalize"], selection_bias=bias)

    y = call()
    assert y.dtype == dtype and y.shape == (c["T"], c["H"])
    ref = oracle.grove_moe(to64(p["x"]), to64(logits), to64(p["w1"]), to64(p["w2"]),
                           to64(p["a1"]), to64(p["a2"]), c["k"], c["S"], LAM,
                           c["renormalize"], to64(bias))
    assert_close(y, ref, "y", torch_out=backend_reference(call, backend))


# ----------------------------------------------------------------------------- vLLM drop-in

FUSED_CASES = {
    "base": {},
    "T1": dict(T=1),
    "odd_sizes": dict(T=23, H=33, I=17),
    "k1": dict(k=1),
    "k4": dict(k=4),
    "one_expert": dict(kind="one_expert"),
    "sparse": dict(kind="sparse"),
}


def _fused_oracle(p, w, ids, **kw):
    return oracle.fused_experts(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(w),
                                ids.cpu(), **kw)


@DTYPES
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_experts(backend, gen, case, dtype):
    c = {**BASE, **FUSED_CASES[case]}
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype)
    w, ids = routing(c["T"], c["E"], c["k"], gen, c["kind"])
    x0 = p["x"].clone()

    def call():
        return gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids)

    y = call()
    assert y.dtype == dtype and y.shape == (c["T"], c["H"])
    assert torch.equal(p["x"], x0)
    assert_close(y, _fused_oracle(p, w, ids), "y", torch_out=backend_reference(call, backend))


@DTYPES
@pytest.mark.parametrize("k", [1, 2])
def test_fused_experts_weight_on_input(backend, gen, k, dtype):
    p = make_grove(29, 40, 8, 24, 8, 2, gen, dtype)
    w, ids = routing(29, 8, k, gen)

    def call():
        return gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids,
                                apply_router_weight_on_input=True)

    y = call()
    ref = _fused_oracle(p, w, ids, apply_router_weight_on_input=True)
    assert rel_err(ref, _fused_oracle(p, w, ids)) > 1e-2  # differs from weighting the output
    assert_close(y, ref, "y", torch_out=backend_reference(call, backend))


# global ids 0..7; local experts 0..3 live on this rank, the rest elsewhere
EXPERT_MAP = [-1, 0, -1, 1, 2, -1, 3, -1]


@DTYPES
@pytest.mark.parametrize("weight_on_input", [False, True], ids=["weight_out", "weight_in"])
def test_fused_experts_expert_map(backend, gen, weight_on_input, dtype):
    T, k = 37, 1 if weight_on_input else 2
    p = make_grove(T, 40, 4, 24, 8, 2, gen, dtype)
    w, ids = routing(T, 8, k, gen)
    emap = torch.tensor(EXPERT_MAP, dtype=torch.int32)
    y = gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids, global_num_experts=8,
                         expert_map=emap, apply_router_weight_on_input=weight_on_input)
    ref = _fused_oracle(p, w, ids, expert_map=emap,
                        apply_router_weight_on_input=weight_on_input)
    off_rank = (emap.long()[ids] < 0).all(dim=1)
    assert off_rank.any() and not off_rank.all()
    assert torch.all(y[off_rank] == 0), "tokens with no local expert must get exactly 0"
    assert_close(y, ref, "y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("fn", ["fused_experts", "fused_moe"])
def test_inplace(backend, gen, fn, dtype):
    T, E, k = 31, 8, 2
    p = make_grove(T, 40, E, 24, 8, 2, gen, dtype)
    x = p["x"]
    x0 = x.clone()
    if fn == "fused_experts":
        w, ids = routing(T, E, k, gen)
        y = gk.fused_experts(x, p["w1"], p["w2"], w, ids, inplace=True)
        ref = oracle.fused_experts(to64(x0), to64(p["w1"]), to64(p["w2"]), to64(w), ids)
    else:
        gating = router_logits(T, E, gen)
        y = gk.fused_moe(x, p["w1"], p["w2"], gating, k, True, inplace=True)
        ref = oracle.fused_moe(to64(x0), to64(p["w1"]), to64(p["w2"]), to64(gating), k, True)
    assert y is x, "inplace=True must return hidden_states itself"
    assert_close(x, ref, "hidden_states after inplace")


@DTYPES
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "no_renorm"])
@pytest.mark.parametrize("k", [1, 2])
def test_fused_moe(backend, gen, k, renormalize, dtype):
    T, E = 37, 8
    p = make_grove(T, 40, E, 24, 8, 2, gen, dtype)
    gating = router_logits(T, E, gen, dtype)

    def call():
        return gk.fused_moe(p["x"], p["w1"], p["w2"], gating, k, renormalize)

    y = call()
    assert y.dtype == dtype and y.shape == (T, 40)
    ref = oracle.fused_moe(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(gating), k,
                           renormalize)
    assert_close(y, ref, "y", torch_out=backend_reference(call, backend))


def test_fused_moe_expert_map(backend, gen):
    T = 37
    p = make_grove(T, 40, 4, 24, 8, 2, gen)
    gating = router_logits(T, 8, gen)
    emap = torch.tensor(EXPERT_MAP, dtype=torch.int32)
    y = gk.fused_moe(p["x"], p["w1"], p["w2"], gating, 2, True, global_num_experts=8,
                     expert_map=emap)
    ref = oracle.fused_moe(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(gating), 2, True,
                           expert_map=emap)
    assert_close(y, ref, "y")


# ----------------------------------------------------------------------------- T = 0


@DTYPES
def test_empty_batch(backend, layout, gen, dtype):
    H, E = 40, 8
    p = make_grove(0, H, E, 24, 8, 2, gen, dtype)
    w, ids = routing(0, E, 2, gen)
    logits = router_logits(0, E, gen, dtype)
    outs = {
        "fused_grove_experts": gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"],
                                                      p["a2"], w, ids),
        "grove_moe": gk.grove_moe(p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=2),
        "fused_experts": gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids),
        "fused_moe": gk.fused_moe(p["x"], p["w1"], p["w2"], logits, 2, True),
    }
    for name, y in outs.items():
        assert y.shape == (0, H) and y.dtype == dtype, name
    tw, tids = gk.grove_topk(logits, 2)
    assert tw.shape == tids.shape == (0, 2)
    assert tw.dtype == torch.float32 and tids.dtype == torch.int32
    fw, fids, tei = gk.fused_topk(p["x"], logits, 2, True)
    assert fw.shape == fids.shape == tei.shape == (0, 2)
    assert fw.dtype == torch.float32 and fids.dtype == tei.dtype == torch.int32
