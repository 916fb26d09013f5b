"""Bad inputs raise ValueError / TypeError / IndexError naming the argument (docs/design.md §2).

Each case starts from a valid call (T=5, H=16, E=8, I=12, Ia=4, k=2, S=2, G=4), changes one
thing, and expects an exception whose message matches the argument's name. Where two
arguments disagree (w1 vs hidden_states on H), naming either one is accepted.
"""
import pytest
import torch

import grove_kernels as gk
from grove_kernels import _validate

T, H, E, I, Ia, K, S = 5, 16, 8, 12, 4, 2, 2
G = E // S
SHAPE = (ValueError,)
DTYPE = (TypeError, ValueError)
INDEX = (IndexError,)


def _valid():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        hidden_states=r(T, H), w1=r(E, 2 * I, H), w2=r(E, H, I), a1=r(G, 2 * Ia, H),
        a2=r(G, H, Ia), topk_weights=torch.rand(T, K, generator=g),
        topk_ids=torch.rand(T, E, generator=g).argsort(1)[:, :K].to(torch.int32),
        router_logits=r(T, E),
    )


def _grove_experts(a, **kw):
    return gk.fused_grove_experts(a["hidden_states"], a["w1"], a["w2"], a["a1"], a["a2"],
                                  a["topk_weights"], a["topk_ids"], **kw)


def _grove_moe(a, top_k=K, **kw):
    return gk.grove_moe(a["hidden_states"], a["router_logits"], a["w1"], a["w2"], a["a1"],
                        a["a2"], top_k=top_k, **kw)


def _fused_experts(a, **kw):
    return gk.fused_experts(a["hidden_states"], a["w1"], a["w2"], a["topk_weights"],
                            a["topk_ids"], **kw)


def _fused_moe(a, topk=K, **kw):
    return gk.fused_moe(a["hidden_states"], a["w1"], a["w2"], a["router_logits"], topk, True,
                        **kw)


# (argument changes, expected exception types, regex on the message)
TENSOR_CASES = {
    "x_1d": (dict(hidden_states=lambda t: t[0]), SHAPE, "hidden_states"),
    "x_not_tensor": (dict(hidden_states=lambda t: t.tolist()), DTYPE, "hidden_states"),
    "x_int": (dict(hidden_states=lambda t: t.long()), DTYPE, "hidden_states"),
    "x_H": (dict(hidden_states=lambda t: t[:, :-1]), SHAPE, "hidden_states|w1"),
    "w1_2d": (dict(w1=lambda t: t[0]), SHAPE, "w1"),
    "w1_H": (dict(w1=lambda t: t[..., :-1]), SHAPE, "w1|hidden_states"),
    "w1_rows": (dict(w1=lambda t: t[:, :-1]), SHAPE, "w1|w2"),
    "w1_E": (dict(w1=lambda t: t[:-1]), SHAPE, "w1|w2"),
    "w1_bf16": (dict(w1=lambda t: t.bfloat16()), DTYPE, "w1"),
    "w2_2d": (dict(w2=lambda t: t[0]), SHAPE, "w2"),
    "w2_I": (dict(w2=lambda t: t[..., :-1]), SHAPE, "w2|w1"),
    "w2_H": (dict(w2=lambda t: t[:, :-1]), SHAPE, "w2"),
    "w2_fp16": (dict(w2=lambda t: t.half()), DTYPE, "w2"),
    "tw_1d": (dict(topk_weights=lambda t: t[:, 0]), SHAPE, "topk_weights"),
    "tw_k": (dict(topk_weights=lambda t: t[:, :1]), SHAPE, "topk_weights|topk_ids"),
    "tw_T": (dict(topk_weights=lambda t: t[:-1]), SHAPE, "topk_weights|topk_ids|hidden"),
    "tw_int": (dict(topk_weights=lambda t: t.long()), DTYPE, "topk_weights"),
    "ids_1d": (dict(topk_ids=lambda t: t[:, 0]), SHAPE, "topk_ids"),
    "ids_T": (dict(topk_ids=lambda t: t[:-1], topk_weights=lambda t: t[:-1]), SHAPE,
              "topk_ids|topk_weights|hidden_states"),
    "ids_float": (dict(topk_ids=lambda t: t.float()), DTYPE, "topk_ids"),
    "ids_int16": (dict(topk_ids=lambda t: t.to(torch.int16)), DTYPE, "topk_ids"),
    "ids_negative": (dict(topk_ids=lambda t: torch.where(t == t[2, 1], -1, t)), INDEX,
                     "topk_ids"),
    "ids_too_big": (dict(topk_ids=lambda t: torch.where(t == t[3, 0], E, t)), INDEX,
                    "topk_ids"),
}
ADJ_CASES = {
    "a1_2d": (dict(a1=lambda t: t[0]), SHAPE, "a1"),
    "a1_groups": (dict(a1=lambda t: torch.cat([t, t[:1]])), SHAPE, "a1"),
    "a1_H": (dict(a1=lambda t: t[..., :-1]), SHAPE, "a1"),
    "a1_rows": (dict(a1=lambda t: t[:, :-1]), SHAPE, "a1|a2"),
    "a1_bf16": (dict(a1=lambda t: t.bfloat16()), DTYPE, "a1"),
    "a2_2d": (dict(a2=lambda t: t[0]), SHAPE, "a2"),
    "a2_groups": (dict(a2=lambda t: t[:-1]), SHAPE, "a2|a1"),
    "a2_Ia": (dict(a2=lambda t: t[..., :-1]), SHAPE, "a2|a1"),
    "a2_H": (dict(a2=lambda t: t[:, :-1]), SHAPE, "a2"),
}


def _mutate(changes):
    a = _valid()
    for name, fn in changes.items():
        a[name] = fn(a[name])
    return a


@pytest.mark.parametrize("case", list(TENSOR_CASES) + list(ADJ_CASES))
def test_fused_grove_experts_bad_tensor(backend, case):
    changes, exc, match = {**TENSOR_CASES, **ADJ_CASES}[case]
    with pytest.raises(exc, match=match):
        _grove_experts(_mutate(changes))


@pytest.mark.parametrize("case", [c for c in TENSOR_CASES if not c.startswith("x_not")])
def test_fused_experts_bad_tensor(backend, case):
    changes, exc, match = TENSOR_CASES[case]
    with pytest.raises(exc, match=match):
        _fused_experts(_mutate(changes))


@pytest.mark.parametrize("group_size", [3, 0, -2, 16, 5])
def test_bad_group_size(backend, group_size):
    with pytest.raises((ValueError, TypeError), match="group_size"):
        _grove_experts(_valid(), group_size=group_size)
    with pytest.raises((ValueError, TypeError), match="group_size"):
        _grove_moe(_valid(), group_size=group_size)


def test_group_size_changes_group_count(backend):
    """S = 4 is legal for E = 8 but then a1/a2 must have 2 groups, not 4."""
    with pytest.raises(ValueError, match="a1|a2"):
        _grove_experts(_valid(), group_size=4)


ROUTER_CASES = {
    "logits_1d": (dict(router_logits=lambda t: t[0]), SHAPE, "router_logits"),
    "logits_E": (dict(router_logits=lambda t: t[:, :-1]), SHAPE, "router_logits|w1"),
    "logits_T": (dict(router_logits=lambda t: t[:-1]), SHAPE, "router_logits|hidden_states"),
    "logits_int": (dict(router_logits=lambda t: t.long()), DTYPE, "router_logits"),
    "x_1d": TENSOR_CASES["x_1d"],
    "x_H": TENSOR_CASES["x_H"],
    "w1_bf16": TENSOR_CASES["w1_bf16"],
    "w2_I": TENSOR_CASES["w2_I"],
    **ADJ_CASES,
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_grove_moe_bad_tensor(backend, case):
    changes, exc, match = ROUTER_CASES[case]
    with pytest.raises(exc, match=match):
        _grove_moe(_mutate(changes))


@pytest.mark.parametrize("case", [c for c in ROUTER_CASES if c.startswith(("logits", "x_", "w"))])
def test_fused_moe_bad_tensor(backend, case):
    changes, exc, match = ROUTER_CASES[case]
    match = match.replace("router_logits", "gating_output")
    with pytest.raises(exc, match=match):
        _fused_moe(_mutate(changes))


BAD_K = [0, -1, E + 1, 2.0, True]


@pytest.mark.parametrize("top_k", BAD_K)
def test_bad_top_k(backend, top_k):
    a = _valid()
    exc = (ValueError, TypeError)
    with pytest.raises(exc, match="top_k"):
        gk.grove_topk(a["router_logits"], top_k)
    with pytest.raises(exc, match="top_k"):
        _grove_moe(a, top_k=top_k)


@pytest.mark.parametrize("topk", BAD_K)
def test_bad_topk_vllm(backend, topk):
    """vLLM's functions call the argument `topk`: the message must say so."""
    a = _valid()
    exc = (ValueError, TypeError)
    with pytest.raises(exc, match=r"\btopk\b"):
        gk.fused_topk(a["hidden_states"], a["router_logits"], topk, True)
    with pytest.raises(exc, match=r"\btopk\b"):
        _fused_moe(a, topk=topk)


@pytest.mark.parametrize("bias", ["long", "short", "2d", "int"])
def test_bad_selection_bias(backend, bias):
    a = _valid()
    b = {"long": torch.zeros(E + 1), "short": torch.zeros(E - 1), "2d": torch.zeros(1, E),
         "int": torch.zeros(E, dtype=torch.long)}[bias]
    with pytest.raises((ValueError, TypeError), match="selection_bias"):
        gk.grove_topk(a["router_logits"], K, selection_bias=b)
    with pytest.raises((ValueError, TypeError), match="selection_bias"):
        _grove_moe(a, selection_bias=b)


@pytest.mark.parametrize("logits", ["1d", "3d", "int"])
def test_grove_topk_bad_logits(backend, logits):
    t = _valid()["router_logits"]
    t = {"1d": t[0], "3d": t[None], "int": t.long()}[logits]
    with pytest.raises((ValueError, TypeError), match="router_logits"):
        gk.grove_topk(t, K)


def test_fused_topk_mismatched_tokens(backend):
    a = _valid()
    with pytest.raises(ValueError, match="hidden_states|gating_output"):
        gk.fused_topk(a["hidden_states"][:-1], a["router_logits"], K, True)
    with pytest.raises(ValueError, match="gating_output"):
        gk.fused_topk(a["hidden_states"], a["router_logits"][0], K, True)


@pytest.mark.parametrize("activation", ["relu", "swish", "", None])
def test_unknown_activation(backend, activation):
    with pytest.raises((ValueError, TypeError), match="activation"):
        _fused_experts(_valid(), activation=activation)
    with pytest.raises((ValueError, TypeError), match="activation"):
        _fused_moe(_valid(), activation=activation)


def _ep_args():
    """Valid expert-parallel call: 8 global experts, 4 on this rank."""
    a = _valid()
    a["w1"], a["w2"] = a["w1"][:4], a["w2"][:4]
    emap = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
    return a, emap


def test_expert_map_valid_baseline(backend):
    a, emap = _ep_args()
    y = _fused_experts(a, global_num_experts=E, expert_map=emap)
    assert y.shape == (T, H) and torch.isfinite(y).all()


@pytest.mark.parametrize("bad", ["short", "long", "2d", "float"])
def test_bad_expert_map(backend, bad):
    a, emap = _ep_args()
    emap = {"short": emap[:-1], "long": torch.cat([emap, emap[:1]]), "2d": emap[None],
            "float": emap.float()}[bad]
    with pytest.raises((ValueError, TypeError), match="expert_map"):
        _fused_experts(a, global_num_experts=E, expert_map=emap)
    with pytest.raises((ValueError, TypeError), match="expert_map"):
        _fused_moe(a, global_num_experts=E, expert_map=emap)


def test_expert_map_values_out_of_range(backend):
    """Local indices must address w1's experts: 4 here."""
    a, emap = _ep_args()
    emap = torch.where(emap == 3, 4, emap)
    with pytest.raises(IndexError, match="expert_map"):
        _fused_experts(a, global_num_experts=E, expert_map=emap)


def test_global_ids_out_of_range(backend):
    a, emap = _ep_args()
    a["topk_ids"] = torch.where(a["topk_ids"] == a["topk_ids"][1, 1], E, a["topk_ids"])
    with pytest.raises(IndexError, match="topk_ids"):
        _fused_experts(a, global_num_experts=E, expert_map=emap)


@pytest.mark.parametrize("name", ["nope", "", "TORCH", None])
def test_unknown_backend(name):
    before = gk.get_backend()
    with pytest.raises(ValueError, match="backend"):
        gk.set_backend(name)
    with pytest.raises(ValueError, match="backend"):
        with gk.use_backend(name):
            pass
    assert gk.get_backend() == before


def test_use_backend_restores(backend):
    before = gk.get_backend()
    with gk.use_backend("torch"):
        assert gk.get_backend() == "torch"
    assert gk.get_backend() == before == backend


@pytest.fixture
def no_value_checks():
    with _validate.value_checks(False):
        yield


@pytest.mark.parametrize("outer", [True, False])
def test_value_checks_block_restores_the_callers_setting(outer):
    gk.set_value_checks(outer)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with _validate.value_checks(not outer):
                assert gk.value_checks_enabled() is (not outer)
                raise RuntimeError("inside")
        assert gk.value_checks_enabled() is outer
    finally:
        gk.set_value_checks(True)


def test_value_checks_switch(backend, no_value_checks):
    """With the host-side checks off, out-of-range ids are not caught by the range check.

    What the kernels do with such ids is then unspecified; on the CPU torch indexing still
    refuses them, so any exception is accepted as long as it is not the range check's.
    """
    a = _valid()
    a["topk_ids"] = torch.where(a["topk_ids"] == a["topk_ids"][3, 0], E, a["topk_ids"])
    for fn in (_grove_experts, _fused_experts):
        try:
            fn(a)
        except Exception as exc:  # noqa: BLE001
            assert "topk_ids" not in str(exc), f"range check ran while disabled: {exc}"
    good = _valid()
    _grove_experts(good)  # valid input still works with checks off
    gk.set_value_checks(True)
    with pytest.raises(IndexError, match="topk_ids"):
        _grove_experts(a)
