"""The Triton routing and plan kernels (grove_kernels/triton/routing.py, plan.py) against the
torch versions: every Plan field identical (torch.equal, same dtype and shape) to
grove_kernels.plan.build_plan's; topk ids equal to reference_routing.topk's, weights within 1e-6.

Plan weights here are multiples of 1/256, so λ·Σw is exact in any summation order: the torch
plan's .sum(-1) runs in torch's own order (not slot order for k = 5..7 on the CPU, another one
on CUDA), the Triton plan in slot order. test_group_weight_is_slot_order_sum covers arbitrary
weights. With a GPU the kernels run compiled on it; without one, under the Triton interpreter
on the CPU (conftest.py).
"""
import pytest
import torch

from grove_kernels import routing as reference_routing
from grove_kernels.plan import build_plan as torch_plan
from grove_kernels.triton.plan import build_plan as triton_plan
from grove_kernels.triton.routing import topk as triton_topk
from helpers import router_logits

# Compiled Triton needs CUDA tensors; the interpreter runs on CPU ones.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("row_token", "row_weight", "expert_offsets", "adjugate_offsets", "token_rows",
          "token_weight", "token_mask", "group_match")


def _routing(T, E, k, S, kind, gen, wdtype=torch.float32, dyadic=True):
    """(weights [T, k], ids [T, k] (int32; int64 for "invalid"), expert_map or None, the
    plan's num_experts)."""
    expert_map, E_local = None, E
    scores = torch.rand(T, E, generator=gen)
    if kind == "one_expert":  # slot 0 of every token on the same expert
        scores[:, E // 2 - 1] = -1.0
    ids = scores.argsort(1)[:, :k]
    if kind == "coselected":  # whole groups: every expert of k // S groups
        groups = torch.rand(T, E // S, generator=gen).argsort(1)[:, :k // S]
        ids = (groups[:, :, None] * S + torch.arange(S)).reshape(T, k)
        ids = ids.gather(1, torch.rand(T, k, generator=gen).argsort(1))
    elif kind == "duplicates":  # the same expert twice in a token
        ids[:, -1] = ids[:, 0]
    elif kind == "invalid":  # value checks off: ids out of [0, E) are skipped slots
        bad = torch.rand(T, k, generator=gen) < 0.3
        ids = torch.where(bad, torch.tensor([-1, E, 1 << 40])[torch.arange(T * k) % 3].view(T, k),
                          ids)
    elif kind == "map":  # E global experts, half on this rank; some ids off the map entirely
        E_local = E // 2
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[torch.randperm(E, generator=gen)[:E_local]] = torch.arange(E_local,
                                                                              dtype=torch.int32)
        ids = torch.where(torch.rand(T, k, generator=gen) < 0.15, E + 3, ids)
    else:
        assert kind in ("random", "one_expert"), kind
    if dyadic:
        w = torch.randint(26, 256, (T, k), generator=gen) / 256
    else:
        w = torch.rand(T, k, generator=gen) * 0.9 + 0.1
    dtype = torch.int64 if kind == "invalid" else torch.int32
    if expert_map is not None:
        expert_map = expert_map.to(DEVICE)
    return w.to(DEVICE, wdtype), ids.to(DEVICE, dtype), expert_map, E_local


def _assert_same_plan(got, want):
    for name in ("num_tokens", "top_k", "num_experts", "num_groups"):
        assert getattr(got, name) == getattr(want, name), name
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), name
        assert torch.equal(a, b), f"{name}:\n{a}\n{b}"


CASES = [  # T, E, k, S, kind, weight dtype
    (0, 8, 2, 2, "random", torch.float32),
    (0, 8, 2, 0, "random", torch.float32),
    (1, 8, 2, 2, "random", torch.float32),
    (1, 8, 1, 1, "random", torch.float32),
    (1, 16, 8, 4, "coselected", torch.float32),
    (13, 8, 1, 1, "random", torch.float32),
    (13, 8, 1, 2, "random", torch.float32),
    (17, 8, 3, 2, "random", torch.float32),
    (11, 16, 4, 4, "random", torch.float32),
    (65, 16, 6, 4, "random", torch.float32),
    (70, 16, 8, 2, "random", torch.float32),
    (70, 8, 8, 2, "random", torch.float32),  # k = E: ka = G < k truncates the adjugate section
    (9, 8, 8, 4, "coselected", torch.float32),
    (33, 16, 8, 4, "coselected", torch.float32),
    (40, 16, 4, 2, "coselected", torch.float32),
    (10, 8, 1, 2, "one_expert", torch.float32),  # every token on one expert
    (50, 16, 4, 2, "one_expert", torch.float32),
    (12, 8, 3, 0, "random", torch.float32),  # no adjugates
    (12, 4, 2, 8, "random", torch.float32),  # S > E: G = 0
    (20, 8, 4, 2, "duplicates", torch.float32),
    (30, 16, 4, 2, "invalid", torch.float32),
    (30, 16, 4, 2, "map", torch.float32),
    (25, 16, 3, 4, "map", torch.float32),
    (21, 16, 4, 2, "random", torch.float64),
    (21, 16, 4, 4, "coselected", torch.float64),
    (19, 8, 4, 2, "random", torch.bfloat16),
    (19, 8, 4, 2, "random", torch.float16),
]


@pytest.mark.parametrize("T,E,k,S,kind,wdtype", CASES,
                         ids=["-".join(map(str, c[:5])) + f"-{str(c[5])[6:]}" for c in CASES])
def test_plan_matches_torch(T, E, k, S, kind, wdtype, gen):
    w, ids, expert_map, E_local = _routing(T, E, k, S, kind, gen, wdtype)
    lam = 0.3 if wdtype == torch.float64 else 0.05  # 0.3: not an fp32 number
    got = triton_plan(ids, w, E_local, S, lam, expert_map)
    _assert_same_plan(got, torch_plan(ids, w, E_local, S, lam, expert_map))


@pytest.mark.parametrize("T,E,k,S", [(37, 16, 8, 2), (29, 8, 3, 1), (45, 16, 6, 2)])
def test_plan_matches_torch_any_weights(T, E, k, S, gen):
    # At most two terms per group sum: every summation order gives the same bits.
    w, ids, _, _ = _routing(T, E, k, S, "random", gen, dyadic=False)
    _assert_same_plan(triton_plan(ids, w, E, S, 0.05), torch_plan(ids, w, E, S, 0.05))


def test_group_weight_is_slot_order_sum(gen):
    T, E, k, S, lam = 31, 8, 6, 4, 0.05  # 3 or 4 experts of each group per token
    w, ids, _, _ = _routing(T, E, k, S, "random", gen, dyadic=False)
    got, want = triton_plan(ids, w, E, S, lam), torch_plan(ids, w, E, S, lam)
    for name in FIELDS:
        if name not in ("row_weight", "token_weight"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    total = torch.zeros(T, k, device=DEVICE)
    for m in range(k):
        total = total + torch.where(want.group_match[:, :, m], w[:, m, None], 0.0)
    scale = torch.tensor(lam, dtype=torch.float32, device=DEVICE)
    slot_order = torch.where(want.token_mask[:, k:], scale * total, 0.0)
    assert torch.equal(got.token_weight[:, k:], slot_order)
    assert torch.allclose(got.row_weight, want.row_weight, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("T,E,k", [(1, 8, 1), (70, 16, 8), (33, 12, 3)])
def test_topk_matches_reference(T, E, k, renormalize, bias, dtype, gen):
    logits = router_logits(T, E, gen, dtype, DEVICE)
    selection_bias = (torch.randn(E, generator=gen) * 0.1).to(DEVICE) if bias else None
    w, ids = triton_topk(logits, k, renormalize, selection_bias)
    w_ref, ids_ref = reference_routing.topk(logits, k, renormalize, selection_bias)
    assert (w.dtype, ids.dtype, w.shape) == (torch.float32, torch.int32, (T, k))
    assert torch.equal(ids, ids_ref)
    assert (w - w_ref).abs().max() <= 1e-6


def test_topk_empty_and_strided(gen):
    w, ids = triton_topk(torch.zeros(0, 8, device=DEVICE), 2, True, None)
    assert w.shape == ids.shape == (0, 2)
    logits = router_logits(20, 24, gen, device=DEVICE).t().contiguous().t()  # column-major
    w, ids = triton_topk(logits, 4, True, None)
    w_ref, ids_ref = reference_routing.topk(logits, 4, True, None)
    assert torch.equal(ids, ids_ref) and (w - w_ref).abs().max() <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,k,S", [(257, 16, 8, 4), (4096, 128, 8, 2)])
def test_plan_on_gpu_is_sync_free_and_captures(T, E, k, S, gen):
    lam = 0.05
    routings = [_routing(T, E, k, S, kind, gen) for kind in ("random", "coselected", "map")]
    logits = router_logits(T, E, gen, device=DEVICE)
    bias = torch.zeros(E, device=DEVICE)
    for w, ids, expert_map, E_local in routings:
        # Compile outside the sync check.
        triton_plan(ids, w, E_local, S, lam, expert_map)
        triton_topk(logits, k, True, bias)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = triton_plan(ids, w, E_local, S, lam, expert_map)
            triton_topk(logits, k, True, bias)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        _assert_same_plan(got, torch_plan(ids, w, E_local, S, lam, expert_map))

    w, ids = routings[0][0].clone(), routings[0][1].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_plan(ids, w, E, S, lam)
    for w_new, ids_new, _, _ in routings[1::-1]:  # new routing first: nothing ran at capture
        w.copy_(w_new)
        ids.copy_(ids_new)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same_plan(captured, torch_plan(ids, w, E, S, lam))
