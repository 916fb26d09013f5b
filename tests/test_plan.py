"""The dispatch plan (grove_kernels/plan.py) against a host-side construction from its definition.

Checks, per case: each problem's rows are exactly its (token) multiset, weights match, every
token's expert and adjugate rows are found through token_rows, duplicates inside a group are
merged into one adjugate row with weight λ·Σw, padding rows stay in bounds, and the plan is
built without host syncs (GPU).
"""
import pytest
import torch

from grove_kernels.plan import build_plan


def _routing(T, E, k, seed, mode="random"):
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.long)
    elif mode == "one_expert":  # all tokens on expert 0 (k == 1) / experts 0..k-1
        ids = torch.arange(k).repeat(T, 1)
    elif mode == "coselected":  # both experts of a group for every token
        base = torch.randint(0, E // 2, (T, (k + 1) // 2), generator=g) * 2
        ids = torch.stack([base, base + 1], -1).reshape(T, -1)[:, :k]
    w = torch.rand(T, k, generator=g) + 0.1
    return w, ids.to(torch.int32)


def _expected(w, ids, E, S, lam, expert_map=None):
    """Per problem: sorted list of (token, weight); per token: dict problem -> weight."""
    T, k = ids.shape
    local = ids.long() if expert_map is None else expert_map.long()[ids.long()]
    problems = {}
    for t in range(T):
        groups = {}
        for j in range(k):
            e = int(local[t, j])
            if e < 0:
                continue
            problems.setdefault(e, []).append((t, float(w[t, j])))
            if S:
                groups[e // S] = groups.get(e // S, 0.0) + float(w[t, j])
        for g, s in groups.items():
            problems.setdefault(E + g, []).append((t, lam * s))
    return {p: sorted(v) for p, v in problems.items()}


def _actual(plan):
    problems = {}
    sections = [(plan.expert_token, plan.expert_weight, plan.expert_offsets, 0)]
    if plan.num_groups:
        sections.append((plan.adjugate_token, plan.adjugate_weight, plan.adjugate_offsets,
                         plan.num_experts))
    for token, weight, offsets, base in sections:
        assert offsets[0] == 0 and bool((offsets.diff() >= 0).all())
        assert int(offsets[-1]) <= token.numel()
        for p in range(offsets.numel() - 1):
            lo, hi = int(offsets[p]), int(offsets[p + 1])
            if hi > lo:
                problems[base + p] = sorted(zip(token[lo:hi].tolist(), weight[lo:hi].tolist()))
        # Padding rows: in-bounds token, zero weight.
        pad = slice(int(offsets[-1]), None)
        assert bool((weight[pad] == 0).all())
        assert bool(((token[pad] >= 0) & (token[pad] < max(plan.num_tokens, 1))).all())
    return problems


def _same(a, b):
    assert a.keys() == b.keys()
    for p in a:
        assert [t for t, _ in a[p]] == [t for t, _ in b[p]], f"problem {p}"
        assert torch.allclose(torch.tensor([x for _, x in a[p]]),
                              torch.tensor([x for _, x in b[p]]), rtol=1e-6), f"problem {p}"


CASES = [  # T, E, k, S, mode
    (0, 8, 2, 2, "random"), (1, 8, 2, 2, "random"), (17, 8, 3, 2, "random"),
    (13, 8, 1, 1, "random"), (11, 16, 4, 4, "random"), (9, 8, 8, 2, "random"),
    (10, 8, 1, 2, "one_expert"), (7, 8, 4, 2, "coselected"), (12, 8, 3, 0, "random"),
]


@pytest.mark.parametrize("T,E,k,S,mode", CASES)
def test_plan_rows_match_definition(T, E, k, S, mode):
    w, ids = _routing(T, E, k, seed=T * 31 + k, mode=mode)
    plan = build_plan(ids, w, E, S, 0.05)
    _same(_actual(plan), _expected(w, ids, E, S, 0.05))
    G = E // S if S else 0
    assert plan.num_rows == T * k + T * min(k, G)
    start, count = plan.problem_rows()
    assert start.numel() == E + G and int(count.sum()) == len(
        [r for v in _expected(w, ids, E, S, 0.05).values() for r in v])


@pytest.mark.parametrize("T,E,k,S,mode", CASES)
def test_token_rows_reach_every_row(T, E, k, S, mode):
    w, ids = _routing(T, E, k, seed=T + 7 * k, mode=mode)
    plan = build_plan(ids, w, E, S, 0.05)
    tokens = torch.cat([plan.expert_token] + ([plan.adjugate_token] if S else []))
    weights = torch.cat([plan.expert_weight] + ([plan.adjugate_weight] if S else []))
    rows = plan.token_rows[plan.token_mask]
    assert rows.unique().numel() == rows.numel()  # each row belongs to one (token, slot)
    owner = torch.arange(T)[:, None].expand_as(plan.token_rows)[plan.token_mask]
    assert torch.equal(tokens[rows], owner)
    assert torch.allclose(weights[rows], plan.token_weight[plan.token_mask])
    n_valid = int(plan.expert_offsets[-1]) + (int(plan.adjugate_offsets[-1]) if S else 0)
    assert rows.numel() == n_valid


def test_coselected_group_is_one_row():
    ids = torch.tensor([[2, 3, 0], [3, 2, 5]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    plan = build_plan(ids, w, 8, 2, 0.5)
    off = plan.adjugate_offsets
    assert off.diff().tolist() == [1, 2, 1, 0]  # group 0: token 0; group 1: both; group 2: token 1
    g1 = slice(int(off[1]), int(off[2]))
    assert plan.adjugate_token[g1].tolist() == [0, 1]
    assert torch.allclose(plan.adjugate_weight[g1], torch.tensor([0.4, 0.35]))


def test_expert_map_drops_off_rank_slots():
    w, ids = _routing(15, 12, 3, seed=3)
    expert_map = torch.full((12,), -1, dtype=torch.int32)
    expert_map[4:10] = torch.arange(6, dtype=torch.int32)
    plan = build_plan(ids, w, 6, 0, 0.0, expert_map)
    _same(_actual(plan), _expected(w, ids, 6, 0, 0.0, expert_map))
    off_rank = expert_map.long()[ids.long()] < 0
    assert torch.equal(plan.token_mask, ~off_rank)


def test_plan_is_deterministic():
    w, ids = _routing(64, 8, 4, seed=5)
    a, b = build_plan(ids, w, 8, 2, 0.05), build_plan(ids, w, 8, 2, 0.05)
    for name in ("expert_token", "expert_offsets", "adjugate_token", "adjugate_weight",
                 "token_rows", "token_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.gpu
def test_plan_on_gpu_has_no_host_sync_and_captures():
    w, ids = _routing(257, 16, 4, seed=9)
    w, ids = w.cuda(), ids.cuda()
    build_plan(ids, w, 16, 2, 0.05)  # warm-up outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = build_plan(ids, w, 16, 2, 0.05)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _same(_actual(plan), _expected(w.cpu(), ids.cpu(), 16, 2, 0.05))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            captured = build_plan(ids, w, 16, 2, 0.05)
    w2, ids2 = _routing(257, 16, 4, seed=10)
    w.copy_(w2)
    ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    _same(_actual(captured), _expected(w2, ids2, 16, 2, 0.05))


def test_out_of_range_ids_become_skipped_slots():
    # With value checks off nothing validates ids: the plan must still stay in bounds.
    ids = torch.tensor([[0, 9], [-3, 2]], dtype=torch.int32)
    w = torch.ones(2, 2)
    plan = build_plan(ids, w, 8, 2, 0.05)
    assert plan.token_mask[:, :2].tolist() == [[True, False], [False, True]]
    expert_map = torch.arange(4, dtype=torch.int32)
    plan = build_plan(torch.tensor([[1, 7]], dtype=torch.int32), torch.ones(1, 2), 4, 0, 0.0,
                      expert_map)
    assert plan.token_mask.tolist() == [[True, False]]


def test_op_refuses_group_count_mismatch():
    x, w1, w2 = torch.randn(3, 8), torch.randn(6, 4, 8), torch.randn(6, 8, 2)
    a1, a2 = torch.randn(2, 4, 8), torch.randn(2, 8, 2)
    ids, w = torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, 2)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.grove.experts_forward(x, w1, w2, a1, a2, w, ids, None, 4, 0.1, False)
