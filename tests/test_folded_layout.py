"""The folded adjugate layout (GROVE_ADJUGATE_LAYOUT=folded) on the shapes its kernels are most
likely to get wrong, every backend that runs on the CPU, against the float64 oracle:

    narrow     I = 1 with Ia = 2, 3 (per-operand unit strides: a stride decision taken from w2
               and applied to a2 once gave wrong gradients) and Ia = 1 < I
    coselect   S = 4, k = 8, whole groups: 3 of 4 rows of a token lead no group
    wide       Ia > I, so adjugate N tiles outnumber the expert ones in GEMM-1 / dGEMM-2
    blocks     T·k / E well above the interpreter's 16-row blocks: leader prefixes that end
               inside a row block, and blocks without leaders

and every result bitwise identical on a rerun (no atomics, fixed orders).
"""
import pytest
import torch

import grove_kernels as gk
import oracle
from helpers import assert_close, backend_reference, leaf, make_grove, randn, routing, to64

LAM = 0.5
CASES = {  # T, H, E, I, Ia, k, S, kind
    "narrow_I1_Ia2": (13, 24, 8, 1, 2, 2, 2, "random"),
    "narrow_I1_Ia3": (9, 16, 8, 1, 3, 4, 4, "coselected"),
    "narrow_Ia1": (11, 16, 8, 6, 1, 3, 2, "random"),
    "coselect_S4_k8": (7, 24, 16, 8, 4, 8, 4, "coselected"),
    "wide_Ia": (10, 16, 8, 3, 40, 2, 2, "random"),
    "blocks": (61, 32, 8, 20, 12, 4, 2, "coselected"),
}


@pytest.fixture(autouse=True)
def _folded(monkeypatch):
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")


def _run(inputs, ids, S, dy):
    leaves = {n: leaf(t) for n, t in inputs.items()}
    y = gk.fused_grove_experts(leaves["x"], leaves["w1"], leaves["w2"], leaves["a1"],
                               leaves["a2"], leaves["topk_weights"], ids, group_size=S,
                               adjugate_scale=LAM)
    y.backward(dy)
    return y.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_folded_against_oracle(backend, gen, case, dtype):
    T, H, E, I, Ia, k, S, kind = CASES[case]
    inputs = make_grove(T, H, E, I, Ia, S, gen, dtype)
    w, ids = routing(T, E, k, gen, kind, S)
    inputs["topk_weights"] = w
    dy = randn(T, H, gen=gen, dtype=dtype)
    y, grads = _run(inputs, ids, S, dy)
    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.grove_layer(ref["x"], ref["w1"], ref["w2"], ref["a1"], ref["a2"],
                               ref["topk_weights"], ids, S, LAM)
    y_ref.backward(to64(dy))
    torch_run = backend_reference(lambda: _run(inputs, ids, S, dy), backend)
    assert_close(y, y_ref, "y", dtype=dtype, torch_out=torch_run[0] if torch_run else None)
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape, name
        assert_close(g, ref[name].grad, f"d{name}", dtype=dtype,
                     torch_out=torch_run[1][name] if torch_run else None)
    # Rerun: bitwise the same.
    y2, grads2 = _run(inputs, ids, S, dy)
    assert torch.equal(y, y2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name


SCHEDULES = {  # GROVE_TRITON_SCHEDULE, GROVE_TRITON_PROGRAMS
    "tiles": ("tiles", None),
    "persistent_1": ("persistent", "1"),  # one program loops over every tile
    "persistent_2": ("persistent", "2"),  # fewer programs than tiles: the loops stride
    "persistent_wide": ("persistent", "100000"),  # capped at the grid bound: idle exits
}


@pytest.mark.interpreter  # Triton kernels, with no backend parameter to say so
@pytest.mark.parametrize("case", ["blocks", "coselect_S4_k8", "wide_Ia", "narrow_I1_Ia3"])
def test_folded_triton_schedules(gen, monkeypatch, case):
    """The triton backend's persistent schedule (programs looping over the device's tile
    count) against the grid of one program per tile: the oracle, and bitwise equal outputs
    and gradients whatever the program count (each tile is computed the same way)."""
    pytest.importorskip("triton")
    T, H, E, I, Ia, k, S, kind = CASES[case]
    dtype = torch.bfloat16
    inputs = make_grove(T, H, E, I, Ia, S, gen, dtype)
    w, ids = routing(T, E, k, gen, kind, S)
    inputs["topk_weights"] = w
    dy = randn(T, H, gen=gen, dtype=dtype)
    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    oracle.grove_layer(ref["x"], ref["w1"], ref["w2"], ref["a1"], ref["a2"],
                       ref["topk_weights"], ids, S, LAM).backward(to64(dy))
    runs = {}
    with gk.use_backend("triton"):
        for name, (schedule, programs) in SCHEDULES.items():
            monkeypatch.setenv("GROVE_TRITON_SCHEDULE", schedule)
            if programs is None:
                monkeypatch.delenv("GROVE_TRITON_PROGRAMS", raising=False)
            else:
                monkeypatch.setenv("GROVE_TRITON_PROGRAMS", programs)
            runs[name] = _run(inputs, ids, S, dy)
    y, grads = runs["tiles"]
    for name, g in grads.items():
        assert_close(g, ref[name].grad, f"d{name}", dtype=dtype)
    for name, (y2, grads2) in runs.items():
        assert torch.equal(y, y2), name
        for n in grads:
            assert torch.equal(grads[n], grads2[n]), (name, n)


def test_schedule_variables_refuse_bad_values(monkeypatch):
    pytest.importorskip("triton")
    from grove_kernels.triton import config as cfg

    monkeypatch.setenv("GROVE_TRITON_SCHEDULE", "bogus")
    with pytest.raises(ValueError, match="GROVE_TRITON_SCHEDULE"):
        cfg.persistent_programs(132)
    monkeypatch.setenv("GROVE_TRITON_SCHEDULE", "persistent")
    monkeypatch.setenv("GROVE_TRITON_PROGRAMS", "0")
    with pytest.raises(ValueError, match="GROVE_TRITON_PROGRAMS"):
        cfg.persistent_programs(132)
    monkeypatch.setenv("GROVE_TRITON_PROGRAMS", "7")
    assert cfg.persistent_programs(132) == 7
    monkeypatch.delenv("GROVE_TRITON_PROGRAMS")
    assert cfg.persistent_programs(132) == 132 * cfg.PROGRAMS_PER_SM
    monkeypatch.setenv("GROVE_TRITON_SCHEDULE", "tiles")
    assert cfg.persistent_programs(132) == 0
