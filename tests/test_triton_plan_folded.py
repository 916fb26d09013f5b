"""The Triton folded plan (grove_kernels/triton/plan.py, build_folded_plan) against the torch one
(grove_kernels/plan_folded.py): every field identical (torch.equal, same dtype and shape).
Routings as in test_triton_plan.py (dyadic weights: λ·Σw exact in any order; the sum runs in
slot order on both sides anyway)."""
import pytest
import torch

from grove_kernels.plan_folded import build_folded_plan as torch_plan
from grove_kernels.triton.plan import build_folded_plan as triton_plan
from test_triton_plan import DEVICE, _routing

CASES = [  # T, E, k, S, kind, weight dtype
    (0, 8, 2, 2, "random", torch.float32),
    (1, 8, 2, 2, "random", torch.float32),
    (1, 8, 1, 1, "random", torch.float32),
    (1, 16, 8, 4, "coselected", torch.float32),
    (13, 8, 1, 2, "random", torch.float32),
    (17, 8, 3, 2, "random", torch.float32),
    (65, 16, 6, 4, "random", torch.float32),
    (70, 8, 8, 2, "random", torch.float32),
    (33, 16, 8, 4, "coselected", torch.float32),
    (40, 16, 4, 2, "coselected", torch.float32),
    (50, 16, 4, 2, "one_expert", torch.float32),
    (20, 8, 4, 2, "duplicates", torch.float32),
    (30, 16, 4, 2, "invalid", torch.float32),
    (30, 16, 4, 2, "map", torch.float32),
    (25, 16, 3, 4, "map", torch.float32),
    (21, 16, 4, 4, "coselected", torch.float64),
    (19, 8, 4, 2, "random", torch.bfloat16),
]


@pytest.mark.parametrize("T,E,k,S,kind,wdtype", CASES,
                         ids=["-".join(map(str, c[:5])) + f"-{str(c[5])[6:]}" for c in CASES])
def test_folded_plan_matches_torch(T, E, k, S, kind, wdtype, gen):
    w, ids, expert_map, E_local = _routing(T, E, k, S, kind, gen, wdtype)
    lam = 0.3 if wdtype == torch.float64 else 0.05
    got = triton_plan(ids, w, E_local, S, lam, expert_map)
    want = torch_plan(ids, w, E_local, S, lam, expert_map)
    for name in ("num_tokens", "top_k", "num_experts", "num_groups"):
        assert getattr(got, name) == getattr(want, name), name
    got_t, want_t = got.named_tensors(), want.named_tensors()
    for name in want_t:
        a, b = got_t[name], want_t[name]
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), name
        assert torch.equal(a, b), f"{name}:\n{a}\n{b}"


def test_folded_plan_any_weights(gen):
    T, E, k, S = 31, 8, 6, 4
    w, ids, _, _ = _routing(T, E, k, S, "random", gen, dyadic=False)
    for a, b in zip(triton_plan(ids, w, E, S, 0.05).named_tensors().values(),
                    torch_plan(ids, w, E, S, 0.05).named_tensors().values()):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_folded_plan_on_gpu_is_sync_free(gen):
    w, ids, _, _ = _routing(4096, 128, 8, 2, "random", gen)
    triton_plan(ids, w, 128, 2, 0.05)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = triton_plan(ids, w, 128, 2, 0.05)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = torch_plan(ids, w, 128, 2, 0.05).named_tensors().values()
    for a, b in zip(got.named_tensors().values(), want):
        assert torch.equal(a, b)
