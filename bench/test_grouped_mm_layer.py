"""The two torch._grouped_mm layers of the bench (the usual form, bench.grouped_mm_layer, and
the index_add one, bench.grouped_mm_index_add) against the float64 oracle (tests/oracle.py):
y and every gradient (x, w1, w2, a1, a2, topk_weights) of ⟨y, g⟩.

torch 2.13 runs torch._grouped_mm on the CPU for fp32/bf16 (no float64 kernel), so this is
the code the GPU times, run in fp32 (docs/design.md §5: rel. err ≤ 1e-4) and bf16 (≤ 2e-2)
against float64. grouped_mm leaves the rows past its last offset uninitialised on the CPU too, so
the duplicate-group rows of the adjugate section are garbage here as on a GPU: the routings with
many duplicates (`coselected`: every token picks both experts of its groups) fail unless the
masks hold. Freed NaN buffers before each call make that garbage likelier to be NaN.

    x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia], w [T, k], ids [T, k]
"""
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

import oracle  # noqa: E402

from bench.grouped_mm_index_add import grouped_mm_index_add_moe  # noqa: E402
from bench.grouped_mm_layer import adjugate_slots, grouped_mm_moe, sort_slots  # noqa: E402

LAYERS = {"usual": grouped_mm_moe, "index_add": grouped_mm_index_add_moe}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
H, I, IA, SCALE = 32, 16, 8, 0.05


def _routing(kind, T, E, k, S, gen):
    """topk_ids [T, k] int32, distinct per row."""
    if kind == "uniform":
        rows = [torch.randperm(E, generator=gen)[:k] for _ in range(T)]
    elif kind == "one_expert":  # every token's first slot on expert 0; the rest on 1..k-1
        rows = [torch.arange(k) for _ in range(T)]
    elif kind == "coselected":  # whole groups: k/S groups per token, each with all S experts
        G = E // S
        rows = [(torch.randperm(G, generator=gen)[:k // S].repeat_interleave(S) * S
                 + torch.arange(S).repeat(k // S)) for _ in range(T)]
    elif kind == "empty_experts":  # only the first k + 1 experts ever chosen
        rows = [torch.randperm(k + 1, generator=gen)[:k] for _ in range(T)]
    else:
        raise ValueError(kind)
    if not rows:
        return torch.zeros(0, k, dtype=torch.int32)
    return torch.stack(rows).to(torch.int32)


def _problem(T, E, k, S, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = E // S

    def rand(*shape, fan_in=1):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / fan_in**0.5

    tensors = {"x": rand(T, H), "w1": rand(E, 2 * I, H, fan_in=H), "w2": rand(E, H, I, fan_in=I),
               "a1": rand(G, 2 * IA, H, fan_in=H), "a2": rand(G, H, IA, fan_in=IA),
               "w": torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1}
    return tensors, _routing(kind, T, E, k, S, gen), rand(T, H)


def _poison_freed_memory(nbytes):
    """Leaves a freed NaN buffer behind: the CPU allocator's next blocks of this size tend
    to reuse it, so uninitialised rows read NaN rather than stale zeros."""
    torch.full((nbytes // 4,), float("nan"))


def _rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def _check(layer, T, E, k, S, kind, grove, dtype):
    t, ids, g = _problem(T, E, k, S, kind)
    names = ["x", "w1", "w2"] + (["a1", "a2"] if grove else []) + ["w"]
    ref_leaves = {n: t[n].clone().requires_grad_() for n in names}
    if grove:
        ref = oracle.grove_layer(ref_leaves["x"], ref_leaves["w1"], ref_leaves["w2"],
                                 ref_leaves["a1"], ref_leaves["a2"], ref_leaves["w"], ids.long(),
                                 S, SCALE)
    else:
        ref = oracle.fused_experts(ref_leaves["x"], ref_leaves["w1"], ref_leaves["w2"],
                                   ref_leaves["w"], ids.long())
    refs = (ref,) + torch.autograd.grad(ref, [ref_leaves[n] for n in names], g) if T else (ref,)

    leaves = {n: t[n].to(torch.float32 if n == "w" else dtype).requires_grad_() for n in names}
    kwargs = dict(group_size=S, adjugate_scale=SCALE) if grove else {}
    _poison_freed_memory(max(T * k, 1) * H * 4 * 4)
    y = LAYERS[layer](leaves["x"], leaves["w1"], leaves["w2"], leaves["w"], ids,
                      leaves.get("a1"), leaves.get("a2"), **kwargs)
    assert y.shape == (T, H) and y.dtype == dtype
    outs = (y,) + torch.autograd.grad(y, [leaves[n] for n in names], g.to(dtype)) if T else (y,)
    for name, out, r in zip(["y"] + names, outs, refs):
        assert out.shape == r.shape, name
        err = _rel(out, r)
        assert err <= TOL[dtype], f"{name}: rel err {err:.3g} > {TOL[dtype]:g}"


# (T, E, k, S, routing): odd T, k = 1, S = 1, 2, 4, whole groups, one hot expert, empty experts
GRID = [
    (1, 8, 4, 2, "uniform"),
    (13, 8, 4, 2, "uniform"),
    (13, 8, 4, 2, "coselected"),
    (9, 16, 8, 4, "coselected"),
    (11, 8, 1, 2, "uniform"),
    (7, 8, 2, 1, "uniform"),
    (10, 8, 4, 2, "one_expert"),
    (12, 16, 4, 4, "empty_experts"),
]


@pytest.mark.parametrize("grove", [True, False], ids=["grove", "plain"])
@pytest.mark.parametrize("T, E, k, S, kind", GRID)
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_fp32_matches_the_float64_oracle(layer, T, E, k, S, kind, grove):
    _check(layer, T, E, k, S, kind, grove, torch.float32)


@pytest.mark.parametrize("grove", [True, False], ids=["grove", "plain"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_bf16_matches_the_float64_oracle(layer, grove):
    _check(layer, 13, 8, 4, 2, "coselected", grove, torch.bfloat16)


def test_usual_layer_handles_no_tokens():
    _check("usual", 0, 8, 4, 2, "uniform", True, torch.float32)


def test_sort_slots_orders_by_problem_and_sentinel_last():
    key = torch.tensor([2, 0, 3, 0, 1, 3, 2], dtype=torch.int32)  # 3 is the sentinel (P = 3)
    order, offs = sort_slots(key, 3)
    assert order.tolist() == [1, 3, 4, 0, 6, 2, 5]  # stable: equal keys keep slot order
    assert offs.tolist() == [2, 3, 5] and offs.dtype == torch.int32


def test_adjugate_slots_weights_each_group_once():
    # token 0: experts 0, 1 (group 0), 4 (group 2); token 1: 5, 2, 4 (groups 2, 1, 2)
    ids = torch.tensor([[0, 1, 4], [5, 2, 4]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    key, weight = adjugate_slots(w, ids, group_size=2, num_groups=4, adjugate_scale=0.5)
    assert key.tolist() == [[0, 4, 2], [2, 1, 4]]
    torch.testing.assert_close(weight, torch.tensor([[0.4, 0.0, 0.1], [0.2, 0.3, 0.0]]))


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=torch.zeros(4)), ValueError, "x:"),
    (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "topk_ids:"),
    (dict(topk_ids=torch.zeros(4, 2)), TypeError, "topk_ids:"),
    (dict(topk_weights=torch.zeros(4, 3)), ValueError, "topk_weights:"),
    (dict(a2=None), ValueError, "a1, a2:"),
    (dict(w2=torch.zeros(2, 8, 4, dtype=torch.float64)), TypeError, "w2:"),
])
def test_usual_layer_names_the_bad_argument(bad, error, match):
    args = dict(x=torch.zeros(4, 8), w1=torch.zeros(2, 8, 8), w2=torch.zeros(2, 8, 4),
                topk_weights=torch.zeros(4, 2), topk_ids=torch.zeros(4, 2, dtype=torch.int32),
                a1=torch.zeros(1, 8, 8), a2=torch.zeros(1, 8, 4))
    args.update(bad)
    with pytest.raises(error, match=match):
        grouped_mm_moe(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grove", [True, False], ids=["grove", "plain"])
def test_usual_layer_no_sync_and_graph_replay_gpu(grove):
    """bf16 on the GPU: no host sync in forward + backward, and a CUDA graph of it replays
    to the eager result with new routing written in place (stale routing would be O(1) off;
    1e-3 leaves room for any reduction order the kernels do not fix)."""
    t, ids, g = _problem(64, 16, 4, 2, "uniform")
    dev = torch.device("cuda")
    names = ["x", "w1", "w2"] + (["a1", "a2"] if grove else []) + ["w"]
    leaves = {n: t[n].to(dev, torch.float32 if n == "w" else torch.bfloat16).requires_grad_()
              for n in names}
    ids_dev, g = ids.to(dev), g.to(dev, torch.bfloat16)
    kwargs = dict(group_size=2, adjugate_scale=SCALE) if grove else {}

    def step():
        y = grouped_mm_moe(leaves["x"], leaves["w1"], leaves["w2"], leaves["w"], ids_dev,
                           leaves.get("a1"), leaves.get("a2"), **kwargs)
        return (y,) + torch.autograd.grad(y, [leaves[n] for n in names], g)

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    ids_dev.copy_(_routing("uniform", 64, 16, 4, 2, torch.Generator().manual_seed(5)).to(dev))
    graph.replay()
    eager = step()
    for o, e in zip(outs, eager):
        assert _rel(o, e) <= 1e-3
