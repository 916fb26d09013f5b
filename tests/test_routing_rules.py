"""The ranking rule of grove_topk (README "Routing semantics") on every backend, against a
plain float64 computation written here: ties, NaN logits and biases, saturated sigmoids,
fp64 weights for fp64 logits.

    rule_topk(l [T, E], k, bias [E]?) -> w fp64 [T, k], ids [T, k]
        score = l, or sigmoid(l) + bias, in float64
        ids   = sorted by (score desc, l desc, id asc) with NaN counted as -inf, first k
        w     = softmax(l)[ids], / Σ w when renormalizing (NaN rows stay NaN)

Cases: ties (zero router, bf16 logits), sigmoid saturating to 1.0 in fp32 (logits >~ 17), NaN
and -inf tokens, a NaN inside a token, NaN / inf selection bias (refused with value checks on,
ranked as -inf with them off), grove_moe with a NaN token, fp64 logits -> fp64 weights and
gradcheck. The `gpu` variants run the same reproducers on CUDA against the same float64 rule.
"""
import math

import pytest
import torch

import grove_kernels as gk
import oracle
from helpers import BACKENDS, make_grove, to64

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------- the rule

def _key(v):
    return -math.inf if math.isnan(v) else v


def rule_topk(logits, k, renormalize=True, bias=None):
    """Plain float64 computation of the rule, token by token."""
    l64 = logits.detach().cpu().double()
    T, E = l64.shape
    b = None if bias is None else bias.detach().cpu().double()
    weights, ids = [], []
    for t in range(T):
        row = l64[t]
        score = row if b is None else 1.0 / (1.0 + torch.exp(-row)) + b
        order = sorted(range(E), key=lambda e: (-_key(float(score[e])), -_key(float(row[e])), e))
        chosen = order[:k]
        p = torch.softmax(row, 0)[chosen]
        weights.append(p / p.sum() if renormalize else p)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids, dtype=torch.int64)


def check_routing(w, ids, logits, k, renormalize=True, bias=None, tol=1e-6):
    """ids equal the rule's exactly (order included) and lie in range; weights equal the
    rule's where finite, NaN exactly where the rule's are NaN."""
    E = logits.shape[1]
    ref_w, ref_ids = rule_topk(logits, k, renormalize, bias)
    ids = ids.cpu().long()
    assert bool(((ids >= 0) & (ids < E)).all()), f"ids out of [0, {E}): {ids.tolist()}"
    assert torch.equal(ids, ref_ids), f"ids {ids.tolist()} != rule {ref_ids.tolist()}"
    got = w.detach().cpu().double()
    nan_ref = torch.isnan(ref_w)
    assert torch.equal(torch.isnan(got), nan_ref), "NaN weights where the rule has none"
    torch.testing.assert_close(got[~nan_ref], ref_w[~nan_ref], rtol=tol, atol=tol)


@pytest.fixture(params=[True, False], ids=["checks_on", "checks_off"])
def value_checks(request):
    gk.set_value_checks(request.param)
    try:
        yield request.param
    finally:
        gk.set_value_checks(True)


def _nan_batch(gen):
    """Row 1 all NaN, row 2 all -inf, row 3 one NaN logit (expert 5), rows 0 and 4 clean."""
    logits = torch.randn(5, 8, generator=gen)
    logits[1] = NAN
    logits[2] = -INF
    logits[3, 5] = NAN
    return logits


# ----------------------------------------------------------------------------- ties (items 2, 3)

@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "zero_bias"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_zero_router_picks_lowest_ids(backend, with_bias, renormalize):
    logits = torch.zeros(5, 8)
    bias = torch.zeros(8) if with_bias else None
    w, ids = gk.grove_topk(logits, 2, renormalize=renormalize, selection_bias=bias)
    assert ids.tolist() == [[0, 1]] * 5
    check_routing(w, ids, logits, 2, renormalize, bias)


@pytest.mark.parametrize("k", [1, 2])
def test_saturated_sigmoid_keeps_the_larger_logit(backend, k):
    """sigmoid(18) and sigmoid(20) are both 1.0 in fp32; float64 picks the 20."""
    logits = torch.tensor([[18., 20, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 20., 18.]])
    w, ids = gk.grove_topk(logits, k, renormalize=False, selection_bias=torch.zeros(8))
    assert ids.tolist() == [[1, 0][:k], [6, 7][:k]]
    check_routing(w, ids, logits, k, False, torch.zeros(8))


def test_saturated_logits_follow_float64(backend, gen):
    """Logits in [17, 40] with a bias whose steps (0.5) dwarf fp32 rounding."""
    logits = 17 + 23 * torch.rand(32, 16, generator=gen)
    bias = 0.5 * torch.randint(0, 3, (16,), generator=gen).float()
    w, ids = gk.grove_topk(logits, 4, selection_bias=bias)
    check_routing(w, ids, logits, 4, True, bias)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_bf16_ties(backend, gen, with_bias):
    """bf16 randn logits at E = 64 tie often; k = 8 sees many of those ties. The bias (0 or 2)
    keeps the two score ranges apart: no near-tie across them that rounding could flip."""
    logits = torch.randn(128, 64, generator=gen).bfloat16()
    assert (logits.float().sort(1).values.diff(dim=1) == 0).any(), "no tie: the case is moot"
    bias = (2.0 * torch.randint(0, 2, (64,), generator=gen)).float() if with_bias else None
    w, ids = gk.grove_topk(logits, 8, selection_bias=bias)
    check_routing(w, ids, logits, 8, True, bias)


def test_zero_router_grove_moe_matches_float64(backend, gen):
    """A zero-initialised router: every token takes experts 0, 1 with weight 1/2."""
    T, H, E, I, Ia, S, k = 6, 16, 8, 8, 4, 2, 2
    p = make_grove(T, H, E, I, Ia, S, gen)
    logits = torch.zeros(T, E)
    y = gk.grove_moe(p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=k,
                     selection_bias=torch.zeros(E))
    ref = oracle.grove_layer(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(p["a1"]),
                             to64(p["a2"]), torch.full((T, k), 0.5, dtype=torch.float64),
                             torch.tensor([[0, 1]] * T), S, 0.05)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- NaN (item 1)

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the Triton interpreter
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_nan_token_stays_in_its_row(backend, gen, value_checks, with_bias):
    logits = _nan_batch(gen)
    bias = 0.1 * torch.randn(8, generator=gen) if with_bias else None
    w, ids = gk.grove_topk(logits, 2, selection_bias=bias)
    check_routing(w, ids, logits, 2, True, bias)
    assert ids[1].tolist() == [0, 1]
    if not with_bias:  # with one, sigmoid(-inf) + b = b still ranks the -inf row
        assert ids[2].tolist() == [0, 1]
    assert torch.isnan(w[1:4]).all() and torch.isfinite(w[[0, 4]]).all()
    assert 5 not in ids[3].tolist()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_reproducer_nan_row(backend, value_checks):
    torch.manual_seed(0)
    logits = torch.randn(4, 8)
    logits[1] = NAN
    w, ids = gk.grove_topk(logits, 2)
    assert ids[1].tolist() == [0, 1]
    check_routing(w, ids, logits, 2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_grove_moe_nan_token_spares_the_others(backend, gen, value_checks):
    T, H, E, I, Ia, S, k = 5, 16, 8, 8, 4, 2, 2
    p = make_grove(T, H, E, I, Ia, S, gen)
    logits = _nan_batch(gen)
    bias = 0.1 * torch.randn(E, generator=gen)
    args = (p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"])
    y = gk.grove_moe(*args, top_k=k, selection_bias=bias)
    clean = [0, 4]
    ref = oracle.grove_moe(to64(p["x"][clean]), to64(logits[clean]), to64(p["w1"]),
                           to64(p["w2"]), to64(p["a1"]), to64(p["a2"]), k, S, 0.05,
                           selection_bias=to64(bias))
    torch.testing.assert_close(y[clean].double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.isnan(y[1:4]).all()


@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_bias_is_refused_by_value_checks(backend, bad):
    bias = torch.zeros(8)
    bias[3] = bad
    with pytest.raises(ValueError, match="selection_bias"):
        gk.grove_topk(torch.randn(4, 8), 2, selection_bias=bias)
    layer = gk.GroveMoE(16, 8, 8, 2)
    layer.expert_bias.copy_(bias)
    with pytest.raises(ValueError, match="selection_bias"):
        layer(torch.randn(3, 16))


@pytest.mark.parametrize("which", ["one", "all"])
def test_nan_bias_without_checks_ranks_as_minus_inf(backend, gen, which):
    """Checks off (serving): a NaN bias is still bad input, but ids stay in range and follow
    the rule: a NaN score ranks last; with every score NaN the logits decide."""
    logits = torch.randn(16, 8, generator=gen)
    bias = 0.1 * torch.randn(8, generator=gen)
    if which == "one":
        bias[2] = NAN
    else:
        bias[:] = NAN
    gk.set_value_checks(False)
    try:
        w, ids = gk.grove_topk(logits, 3, selection_bias=bias)
    finally:
        gk.set_value_checks(True)
    check_routing(w, ids, logits, 3, True, bias)
    assert torch.isfinite(w).all()
    if which == "all":
        assert torch.equal(ids.long(), logits.argsort(dim=1, descending=True, stable=True)[:, :3])


# ----------------------------------------------------------------------------- fp64 (item 6)

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_weights_dtype_follows_logits(backend, gen, dtype):
    logits = torch.randn(9, 8, generator=gen).to(dtype)
    bias = 0.1 * torch.randn(8, generator=gen)
    w, ids = gk.grove_topk(logits, 3, selection_bias=bias)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_routing(w, ids, logits, 3, True, bias, tol=1e-13 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_grove_topk_gradcheck_fp64(backend, gen, renormalize):
    logits = torch.randn(4, 8, generator=gen, dtype=torch.float64).requires_grad_()
    bias = 0.1 * torch.randn(8, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda l: gk.grove_topk(l, 3, renormalize=renormalize, selection_bias=bias)[0],
        (logits,), fast_mode=True)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_grove_moe_gradcheck_fp64(gen, renormalize):
    """gradcheck at its default eps (1e-6) and tolerances: fp32 weights fail it. fast_mode
    (a random projection of the Jacobian, same eps) keeps the test to a second."""
    T, H, E, I, Ia, S, k = 3, 4, 4, 2, 2, 2, 2
    p = make_grove(T, H, E, I, Ia, S, gen, dtype=torch.float64)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(E, generator=gen, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in
            (p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"])]
    with gk.use_backend("torch"):  # the fused backends refuse fp64 activations
        assert torch.autograd.gradcheck(
            lambda *a: gk.grove_moe(*a, top_k=k, group_size=S, renormalize=renormalize,
                                    selection_bias=bias), args, fast_mode=True)


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("name", BACKENDS)
def test_rules_on_gpu(name, gen):
    """The reproducers above on CUDA, each against the same float64 rule."""
    dev = "cuda"
    logits = _nan_batch(gen)
    nan_bias = torch.zeros(8)
    nan_bias[2] = NAN
    with gk.use_backend(name):
        with pytest.raises(ValueError, match="selection_bias"):
            gk.grove_topk(logits.to(dev), 2, selection_bias=nan_bias.to(dev))
        for checks in (True, False):
            gk.set_value_checks(checks)
            try:
                w, ids = gk.grove_topk(logits.to(dev), 2)
                check_routing(w, ids, logits, 2)
                if not checks:
                    w, ids = gk.grove_topk(logits.to(dev), 2, selection_bias=nan_bias.to(dev))
                    check_routing(w, ids, logits, 2, True, nan_bias)
            finally:
                gk.set_value_checks(True)
        zeros = torch.zeros(5, 8, device=dev)
        assert gk.grove_topk(zeros, 2)[1].tolist() == [[0, 1]] * 5
        sat = torch.tensor([[18., 20, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 20., 18.]])
        w, ids = gk.grove_topk(sat.to(dev), 1, renormalize=False,
                               selection_bias=torch.zeros(8, device=dev))
        assert ids.tolist() == [[1], [6]]
        bf = torch.randn(128, 64, generator=gen).bfloat16()
        for b in (None, 2.0 * torch.randint(0, 2, (64,), generator=gen).float()):
            w, ids = gk.grove_topk(bf.to(dev), 8,
                                   selection_bias=None if b is None else b.to(dev))
            check_routing(w, ids, bf, 8, True, b)
        l64 = torch.randn(9, 8, generator=gen, dtype=torch.float64)
        w, ids = gk.grove_topk(l64.to(dev), 3)
        assert w.dtype == torch.float64
        check_routing(w, ids, l64, 3, tol=1e-13)
