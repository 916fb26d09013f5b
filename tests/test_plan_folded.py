"""The folded dispatch plan (grove_kernels/plan_folded.py) against a host-side construction
from its definition: rows sorted by expert with each expert's leader rows first (slot order
within both parts), leader_ends, leader_weight = λ·Σw of the group in slot order, skipped slots
at the tail with weights 0, token_rows / token_leader / group_match, and d topk_weights.
"""
import pytest
import torch

from grove_kernels.plan_folded import build_folded_plan
from test_plan import _routing

CASES = [  # T, E, k, S, mode
    (0, 8, 2, 2, "random"), (1, 8, 2, 2, "random"), (1, 8, 1, 1, "random"),
    (17, 8, 3, 2, "random"), (13, 8, 1, 1, "random"), (11, 16, 4, 4, "random"),
    (9, 8, 8, 2, "random"), (10, 8, 1, 2, "one_expert"), (10, 8, 4, 2, "one_expert"),
    (7, 8, 4, 2, "coselected"), (12, 8, 3, 1, "coselected"),
]


def _expected(w, ids, E, S, lam, expert_map=None):
    """Per expert: [(token, slot, weight, leader weight)] in row order; skipped slot count."""
    T, k = ids.shape
    local = ids.long() if expert_map is None else expert_map.long()[ids.long()]
    leaders, others = {e: [] for e in range(E)}, {e: [] for e in range(E)}
    skipped = 0
    for t in range(T):
        seen = set()
        for j in range(k):
            e = int(local[t, j])
            if e < 0:
                skipped += 1
                continue
            g = e // S
            if g in seen:
                others[e].append((t, j, float(w[t, j]), 0.0))
                continue
            seen.add(g)
            s = 0.0
            for m in range(k):  # slot order
                if int(local[t, m]) >= 0 and int(local[t, m]) // S == g:
                    s = s + float(w[t, m])
            leaders[e].append((t, j, float(w[t, j]), lam * s))
    return leaders, others, skipped


@pytest.mark.parametrize("T,E,k,S,mode", CASES)
def test_folded_plan_matches_definition(T, E, k, S, mode):
    w, ids = _routing(T, E, k, seed=T * 13 + k, mode=mode)
    lam = 0.05
    plan = build_folded_plan(ids, w, E, S, lam)
    leaders, others, skipped = _expected(w, ids, E, S, lam)
    R = T * k
    assert plan.num_rows == R and plan.num_groups == E // S
    off, ends = plan.expert_offsets, plan.leader_ends
    assert off.dtype == ends.dtype == torch.int64 and off.shape == (E + 1,) and ends.shape == (E,)
    assert int(off[0]) == 0 and int(off[-1]) == R - skipped
    slot_of_row = {}
    for t in range(T):
        for j in range(k):
            if plan.token_mask[t, j]:
                slot_of_row[int(plan.token_rows[t, j])] = (t, j)
    for e in range(E):
        lo, mid, hi = int(off[e]), int(ends[e]), int(off[e + 1])
        assert lo <= mid <= hi
        got = [(int(plan.row_token[r]),) + (slot_of_row[r][1],) + (
            float(plan.row_weight[r]), float(plan.leader_weight[r])) for r in range(lo, hi)]
        want = leaders[e] + others[e]
        assert mid - lo == len(leaders[e]), f"expert {e}: leader_ends"
        assert [g[:2] for g in got] == [x[:2] for x in want], f"expert {e}: row order"
        assert torch.allclose(torch.tensor([g[2:] for g in got]).view(-1, 2),
                              torch.tensor([x[2:] for x in want]).view(-1, 2), rtol=1e-6)
        assert all(bool(plan.token_leader[slot_of_row[r]]) == (r < mid) for r in range(lo, hi))
    pad = slice(int(off[-1]), None)
    assert bool((plan.row_weight[pad] == 0).all() and (plan.leader_weight[pad] == 0).all())
    assert bool(((plan.row_token[pad] >= 0) & (plan.row_token[pad] < max(T, 1))).all())
    # The adjugate problem of g: one row per distinct (token, g).
    for g in range(E // S):
        rows = [r for e in range(g * S, (g + 1) * S) for r in range(int(off[e]), int(ends[e]))]
        tokens = [int(plan.row_token[r]) for r in rows]
        assert len(set(tokens)) == len(tokens)
        want = {t for t in range(T) for j in range(k) if int(ids[t, j]) // S == g}
        assert set(tokens) == want


def test_coselected_group_leads_once():
    ids = torch.tensor([[2, 3, 0], [3, 2, 5]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    plan = build_folded_plan(ids, w, 8, 2, 0.5)
    assert plan.token_leader.tolist() == [[True, False, True], [True, False, True]]
    assert plan.expert_offsets.tolist() == [0, 1, 1, 3, 5, 5, 6, 6, 6]
    assert plan.leader_ends.tolist() == [1, 1, 2, 4, 5, 6, 6, 6]
    # expert 2: token 0 leads group 1, token 1 does not; expert 3: token 1 leads, token 0 not.
    assert plan.row_token.tolist() == [0, 0, 1, 1, 0, 1]
    assert torch.allclose(plan.leader_weight, torch.tensor([0.1, 0.4, 0.0, 0.35, 0.0, 0.15]))
    assert plan.group_match[0].tolist() == [[True, True, False], [True, True, False],
                                            [False, False, True]]


def test_expert_map_skips_go_to_the_tail():
    w, ids = _routing(15, 12, 3, seed=3)
    expert_map = torch.full((12,), -1, dtype=torch.int32)
    expert_map[4:10] = torch.arange(6, dtype=torch.int32)
    plan = build_folded_plan(ids, w, 6, 2, 0.05, expert_map)
    leaders, others, skipped = _expected(w, ids, 6, 2, 0.05, expert_map)
    off_rank = expert_map.long()[ids.long()] < 0
    assert torch.equal(plan.token_mask, ~off_rank) and skipped == int(off_rank.sum())
    assert int(plan.expert_offsets[-1]) == 45 - skipped
    assert not plan.token_leader[off_rank].any()
    for e in range(6):
        assert int(plan.leader_ends[e] - plan.expert_offsets[e]) == len(leaders[e])


def test_topk_weight_grad():
    gen = torch.Generator().manual_seed(0)
    w, ids = _routing(9, 8, 4, seed=4, mode="coselected")
    lam = 0.3
    plan = build_folded_plan(ids, w, 8, 2, lam)
    d_row = torch.randn(plan.num_rows, generator=gen, dtype=torch.float64)
    d_lead = torch.randn(plan.num_rows, generator=gen, dtype=torch.float64)
    got = plan.topk_weight_grad(d_row, d_lead, lam)
    # By autograd through the plan's own weights.
    wl = w.double().requires_grad_()
    p64 = build_folded_plan(ids, wl, 8, 2, lam)
    ((p64.row_weight * d_row).sum() + (p64.leader_weight * d_lead).sum()).backward()
    assert torch.allclose(got, wl.grad)


def test_folded_plan_is_deterministic():
    w, ids = _routing(64, 8, 4, seed=5)
    a, b = build_folded_plan(ids, w, 8, 2, 0.05), build_folded_plan(ids, w, 8, 2, 0.05)
    for x, y in zip(a.named_tensors().values(), b.named_tensors().values()):
        assert torch.equal(x, y)


def test_unknown_layout_is_refused_by_name(monkeypatch):
    import grove_kernels as gk

    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "diagonal")
    x, w1, w2 = torch.randn(3, 8), torch.randn(4, 4, 8), torch.randn(4, 8, 2)
    a1, a2 = torch.randn(2, 4, 8), torch.randn(2, 8, 2)
    ids, w = torch.tensor([[0, 1]] * 3, dtype=torch.int32), torch.ones(3, 2)
    with pytest.raises(ValueError, match="^GROVE_ADJUGATE_LAYOUT"):
        gk.fused_grove_experts(x, w1, w2, a1, a2, w, ids)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("skips", [False, True])
def test_saved_activations_follow_the_layout(backend, skips):
    """A training forward on the folded layout saves the folded plan, h [R, 2I + 2Ia] and
    z [R, I + Ia] with zeros in the adjugate columns of rows that lead no group."""
    import grove_kernels as gk

    if backend not in gk.available_backends():
        pytest.skip(f"{backend} unavailable")
    g = torch.Generator().manual_seed(1)
    T, H, E, I, Ia, k, S = 9, 16, 8, 5, 3, 4, 2
    x, w1, w2 = torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g), \
        torch.randn(E, H, I, generator=g)
    a1, a2 = torch.randn(E // S, 2 * Ia, H, generator=g), torch.randn(E // S, H, Ia, generator=g)
    w, ids = _routing(T, E, k, seed=2, mode="coselected")
    emap = None
    if skips:
        emap = torch.tensor([0, 1, -1, -1, 2, 3, 4, 5, 6, 7], dtype=torch.int32)
        ids = ids.long() + 2
    y, saved = torch.ops.grove.experts_forward(x, w1, w2, a1, a2, w, ids, emap, S, 0.05, False,
                                               True, backend, "folded")
    assert len(saved) == 12
    h, z = saved[-2:]
    assert h.shape == (T * k, 2 * (I + Ia)) and z.shape == (T * k, I + Ia)
    token_leader, token_rows, mask = saved[8], saved[5], saved[7]
    lead = torch.zeros(T * k, dtype=torch.bool)
    lead[token_rows[token_leader]] = True
    assert torch.all(h[~lead, 2 * I:] == 0) and torch.all(z[~lead, I:] == 0)
    assert torch.all(h[lead, 2 * I:] != 0)
    real = torch.zeros(T * k, dtype=torch.bool)
    real[token_rows[mask]] = True
    assert torch.all(h[~real] == 0) and torch.all(z[~real] == 0)
    ref, saved_ref = torch.ops.grove.experts_forward(x, w1, w2, a1, a2, w, ids, emap, S, 0.05,
                                                     False, False, backend, "sections")
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_auto_skips_backends_without_the_layout(monkeypatch):
    """`auto` picks among the backends that run the call's adjugate layout; a backend named
    explicitly that does not run it is refused by name."""
    import grove_kernels as gk
    from grove_kernels import backends

    if "triton" not in gk.available_backends():
        pytest.skip("triton unavailable")
    monkeypatch.setattr(backends, "_auto_candidates", lambda *args: ["triton", "torch"])
    monkeypatch.setattr(backends.BACKENDS["triton"], "layouts", ("sections",))
    x, w1, w2 = torch.randn(3, 8), torch.randn(4, 4, 8), torch.randn(4, 8, 2)
    a1, a2 = torch.randn(2, 4, 8), torch.randn(2, 8, 2)
    weights = (w1, w2, a1, a2)
    with gk.use_backend("auto"):
        assert backends.resolve(x, weights, layout="sections") == "triton"
        assert backends.resolve(x, weights, layout="folded") == "torch"
    ids, w = torch.tensor([[0, 1]] * 3, dtype=torch.int32), torch.ones(3, 2)
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")
    with gk.use_backend("triton"), pytest.raises(ValueError, match="GROVE_ADJUGATE_LAYOUT"):
        gk.fused_grove_experts(x, w1, w2, a1, a2, w, ids)
