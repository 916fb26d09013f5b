"""The low-level ops of the `cuda` backend (torch.ops.grove_cuda) on an sm_90 GPU, against
torch computed in fp32 (skipped elsewhere; the CPU checks are in test_cuda_build.py).

    grouped_gemm   every kernel of the table (grove_kernels/cuda/gemm_kernels.py): experts +
                   adjugates with different N in one launch, problems with no rows, rows
                   outside every problem left untouched, k-grouped: empty problems zeroed;
                   CUDA-graph replay with new routing written in place
    row kernels    gather (± row weight), SwiGLU forward / backward with d row weight,
                   combine (± slot weights), rows_dot_scale; padding rows never written, odd
                   widths and misaligned views (scalar path), bitwise determinism
    folded layout  SwiGLU forward (z, pre-scaled zs, zero_h) / backward (d row weight and d
                   leader weight) and scale_folded over expert rows with leader prefixes,
                   padding rows and an empty expert; every m-grouped kernel over two sections
                   on one row buffer with b_shared = S, nothing written off the leader rows
"""
import pytest
import torch

import grove_kernels.cuda.ext as lib
from grove_kernels.cuda.gemm_kernels import GEMM_KERNELS, SWIGLU
from grove_kernels.plan import build_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not lib.is_available(), reason="needs grove_kernels._C and an sm_90 GPU"),
]

DEV = "cuda"
SENTINEL = 7.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _plan(T=96, k=4, E=16, S=4, skip=(3, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]]
                       for _ in range(T)])
    w = torch.rand(T, k, generator=gen) + 0.1
    return build_plan(ids.to(DEV), w.to(DEV), E, group_size=S, adjugate_scale=0.5), gen


def _rand(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)


def _problems(plan):
    """[(section, j, first local row, rows)] of every problem."""
    start, count = (t.cpu().tolist() for t in plan.problem_rows())
    E, Re = plan.num_experts, plan.num_expert_rows
    return [(0, p, s, c) if p < E else (1, p - E, s - Re, c)
            for p, (s, c) in enumerate(zip(start, count))]


def _swiglu_halves(acc):
    """grove_cuda.h, M_GROUPED_NT_SWIGLU: D[m, j] = silu(acc[m, j]) * acc[m, N/2 + j], acc over
    b's rows as stored (gate rows, then up rows)."""
    gate, up = acc.chunk(2, dim=1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("kernel", GEMM_KERNELS, ids=[k.name for k in GEMM_KERNELS])
def test_grouped_gemm_every_kernel(kernel):
    k_grouped = kernel.grouped == "k"
    b_nk = kernel.majors == "nt"  # B stored [N, K] (w as stored); nn: [K, N]
    swiglu = kernel.epilogue == SWIGLU
    dtype = DTYPES[kernel.dtype]
    plan, gen = _plan()
    Re, Ra = plan.num_expert_rows, plan.num_adjugate_rows
    E, G, H = plan.num_experts, plan.num_groups, 256
    N, K = (384, 64), (H, H)  # experts / adjugates: different N in one launch
    start, count = plan.problem_rows()
    probs = _problems(plan)
    assert sum(c == 0 for s, _, _, c in probs if s == 0) >= 2  # skipped experts: no rows
    if k_grouped:  # weight gradients: out[j] = Σ_rows a^T b over the problem's rows
        a = [_rand(gen, Re, N[0], dtype=dtype), _rand(gen, Ra, N[1], dtype=dtype)]
        b = [_rand(gen, Re, H, dtype=dtype), _rand(gen, Ra, H, dtype=dtype)]
        out = [torch.full((E, N[0], H), SENTINEL, dtype=dtype, device=DEV),
               torch.full((G, N[1], H), SENTINEL, dtype=dtype, device=DEV)]
    else:
        a = [_rand(gen, Re, K[0], dtype=dtype), _rand(gen, Ra, K[1], dtype=dtype)]
        shape = (lambda P, n, k: (P, n, k)) if b_nk else (lambda P, n, k: (P, k, n))
        b = [_rand(gen, *shape(E, N[0], K[0]), dtype=dtype, scale=K[0] ** -0.5),
             _rand(gen, *shape(G, N[1], K[1]), dtype=dtype, scale=K[1] ** -0.5)]
        width = [n // 2 for n in N] if swiglu else N
        out = [torch.full((Re, width[0]), SENTINEL, dtype=dtype, device=DEV),
               torch.full((Ra, width[1]), SENTINEL, dtype=dtype, device=DEV)]
    lib.grouped_gemm(a, b, out, start, count, kernel.name)
    torch.cuda.synchronize()
    covered = [torch.zeros(t.shape[0], dtype=torch.bool) for t in a]
    for s, j, r0, m in probs:
        rows = slice(r0, r0 + m)
        covered[s][rows] = True
        if k_grouped:
            ref = a[s][rows].float().t() @ b[s][rows].float()
            got = out[s][j].float()
        else:
            w = b[s][j].float()
            ref = a[s][rows].float() @ (w.t() if b_nk else w)
            ref = _swiglu_halves(ref) if swiglu else ref
            got = out[s][rows].float()
        if m == 0 and not k_grouped:
            continue
        err = (got - ref).norm() / max(ref.norm(), 1e-6)
        assert err < 1e-2 or (m == 0 and got.abs().max() == 0), (kernel.name, s, j, m, float(err))
    if not k_grouped:
        for s in range(2):  # rows of no problem: never written
            assert (out[s][~covered[s].to(DEV)] == SENTINEL).all()


@pytest.mark.parametrize("kernel", [k for k in GEMM_KERNELS if k.epilogue == SWIGLU],
                         ids=lambda k: k.name)
def test_fused_swiglu_row_scales(kernel):
    """D row r of section s = row_scale[s][r] * silu(gate) * up: the epilogue finds each
    problem's first row from its D pointer, for both sections of one launch (the folded GEMM-1:
    the same rows, other columns of one output)."""
    dtype = DTYPES[kernel.dtype]
    plan, gen = _plan()
    E, G, H = plan.num_experts, plan.num_groups, 256
    Re, Ra = plan.num_expert_rows, plan.num_adjugate_rows
    N = (384, 64)
    start, count = plan.problem_rows()
    a = [_rand(gen, Re, H, dtype=dtype), _rand(gen, Ra, H, dtype=dtype)]
    b = [_rand(gen, E, N[0], H, dtype=dtype, scale=H ** -0.5),
         _rand(gen, G, N[1], H, dtype=dtype, scale=H ** -0.5)]
    scale = [_rand(gen, Re, dtype=torch.float32), _rand(gen, Ra, dtype=torch.float32)]
    out = [torch.full((Re, N[0] // 2), SENTINEL, dtype=dtype, device=DEV),
           torch.full((Ra, N[1] // 2), SENTINEL, dtype=dtype, device=DEV)]
    lib.grouped_gemm(a, b, out, start, count, kernel.name, row_scale=scale)
    torch.cuda.synchronize()
    for s, j, r0, m in _problems(plan):
        if m == 0:
            continue
        rows = slice(r0, r0 + m)
        ref = _swiglu_halves(a[s][rows].float() @ b[s][j].float().t()) * scale[s][rows, None]
        err = (out[s][rows].float() - ref).norm() / max(ref.norm(), 1e-6)
        assert err < 1e-2, (kernel.name, s, j, m, float(err))


@pytest.mark.parametrize("grouped, majors, epilogue",
                         [("m", "nt", None), ("m", "nt", SWIGLU), ("k", "tn", None)])
def test_grouped_gemm_cuda_graph_replays_new_routing(grouped, majors, epilogue):
    kernel = lib.gemm_kernel(torch.bfloat16, grouped, majors, epilogue=epilogue, schedule="coop")
    plan0, gen = _plan(seed=1)
    E, H, N = plan0.num_experts, 256, 128
    Re = plan0.num_expert_rows
    a = _rand(gen, Re, H, dtype=torch.bfloat16)
    rows_layout = grouped == "m"
    b = (_rand(gen, E, N, H, dtype=torch.bfloat16, scale=H ** -0.5) if rows_layout
         else _rand(gen, Re, N, dtype=torch.bfloat16))
    width = N // 2 if epilogue == SWIGLU else N
    out = torch.zeros((Re, width) if rows_layout else (E, H, N), dtype=torch.bfloat16,
                      device=DEV)
    s0, c0 = (t[:E].contiguous() for t in plan0.problem_rows())
    static_s, static_c = s0.clone(), c0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (CUTLASS sets smem attributes)
        lib.grouped_gemm([a], [b], [out], static_s, static_c, kernel)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lib.grouped_gemm([a], [b], [out], static_s, static_c, kernel)
    for seed in (2, 3):
        plan, _ = _plan(seed=seed)
        s, c = (t[:E].contiguous() for t in plan.problem_rows())
        static_s.copy_(s)
        static_c.copy_(c)
        graph.replay()
        torch.cuda.synchronize()
        for p, (r0, m) in enumerate(zip(s.tolist(), c.tolist())):
            rows = slice(r0, r0 + m)
            if rows_layout:
                got, ref = out[rows].float(), a[rows].float() @ b[p].float().t()
                ref = _swiglu_halves(ref) if epilogue == SWIGLU else ref
            else:
                got, ref = out[p].float(), a[rows].float().t() @ b[rows].float()
            assert (got - ref).norm() <= 1e-2 * max(ref.norm(), 1e-6), (seed, p)


def _sections(plan):
    E, G = plan.num_experts, plan.num_groups
    return plan.expert_offsets[E:], plan.adjugate_offsets[G:]


def _real_rows(plan):
    e_end, a_end = (int(t) for t in _sections(plan))
    Re = plan.num_expert_rows
    real = torch.zeros(plan.num_rows, dtype=torch.bool)
    real[:e_end] = True
    real[Re:Re + a_end] = True
    return real.to(DEV)


def _close(got, ref, dtype):
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    err = (got.float() - ref.float()).norm() / max(ref.float().norm(), 1e-6)
    assert err <= tol, float(err)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("H, offset", [(256, 0), (37, 0), (64, 1)])  # vector / odd / misaligned
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_rows(dtype, H, offset, weighted):
    plan, gen = _plan(skip=(3,))
    x = _rand(gen, plan.num_tokens, H + offset, dtype=dtype)[:, offset:]
    out = torch.full((plan.num_rows, H), SENTINEL, dtype=dtype, device=DEV)
    w = plan.row_weight if weighted else None
    e_end, a_end = _sections(plan)
    lib.gather_rows(x, plan.row_token, w, plan.num_expert_rows, e_end, a_end, out)
    real = _real_rows(plan)
    ref = x[plan.row_token].float() * (w[:, None] if weighted else 1.0)
    if weighted:
        _close(out[real], ref[real], dtype)
    else:
        assert torch.equal(out[real], x[plan.row_token][real])  # an exact copy
    assert (out[~real] == SENTINEL).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("N", [96, 37])
def test_swiglu_forward_backward(dtype, N):
    plan, gen = _plan(skip=(3,))
    Re = plan.num_expert_rows
    e_end, _ = _sections(plan)
    h = _rand(gen, Re, 2 * N, dtype=dtype, scale=2.0)
    g = _rand(gen, Re, N, dtype=dtype)
    w = plan.row_weight[:Re]
    real = _real_rows(plan)[:Re]
    z = torch.full((Re, N), SENTINEL, dtype=dtype, device=DEV)
    lib.swiglu_fwd(h, e_end, z)
    hg, hu = h.float()[:, :N], h.float()[:, N:]
    _close(z[real], (torch.nn.functional.silu(hg) * hu)[real], dtype)
    assert (z[~real] == SENTINEL).all()

    hg64 = hg.double().requires_grad_()
    hu64 = hu.double().requires_grad_()
    zz = torch.nn.functional.silu(hg64) * hu64
    (zz * g.double() * w.double()[:, None]).sum().backward()
    dh = torch.full((Re, 2 * N), SENTINEL, dtype=dtype, device=DEV)
    dw = torch.full((Re,), SENTINEL, dtype=torch.float32, device=DEV)
    lib.swiglu_bwd(g, h, w, e_end, dh, dw)
    _close(dh[real, :N], hg64.grad[real], dtype)
    _close(dh[real, N:], hu64.grad[real], dtype)
    ref_dw = (zz.detach() * g.double()).sum(1)
    _close(dw[real], ref_dw[real], torch.float16)  # fp32 sums of rounded inputs
    assert (dw[~real] == 0).all()
    dw2 = torch.empty_like(dw)
    lib.swiglu_bwd(g, h, w, e_end, torch.empty_like(dh), dw2)
    assert torch.equal(dw, dw2)  # deterministic


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("H", [256, 37])
@pytest.mark.parametrize("weighted", [False, True])
def test_combine_rows(dtype, H, weighted):
    plan, gen = _plan(skip=(3,))
    rows = _rand(gen, plan.num_rows, H, dtype=dtype)
    tw = plan.token_weight if weighted else None
    out = torch.full((plan.num_tokens, H), SENTINEL, dtype=dtype, device=DEV)
    lib.combine_rows(rows, plan.token_rows, plan.token_mask, tw, out)
    sel = rows.float()[plan.token_rows] * plan.token_mask[..., None]
    if weighted:
        sel = sel * plan.token_weight[..., None]
    _close(out, sel.sum(1), dtype)
    again = torch.empty_like(out)
    lib.combine_rows(rows, plan.token_rows, plan.token_mask, tw, again)
    assert torch.equal(out, again)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("H", [256, 37])
def test_rows_dot_scale(dtype, H):
    plan, gen = _plan(skip=(3,))
    x = _rand(gen, plan.num_tokens, H, dtype=dtype)
    rows = _rand(gen, plan.num_rows, H, dtype=dtype)
    before = rows.clone()
    dot = torch.full((plan.num_rows,), SENTINEL, dtype=torch.float32, device=DEV)
    e_end, a_end = _sections(plan)
    lib.rows_dot_scale(rows, x, plan.row_token, plan.row_weight, plan.num_expert_rows, e_end,
                       a_end, dot)
    real = _real_rows(plan)
    ref_dot = (before.float() * x[plan.row_token].float()).sum(1)
    _close(dot[real], ref_dot[real], torch.float16)
    assert (dot[~real] == 0).all()
    _close(rows[real], (before.float() * plan.row_weight[:, None])[real], dtype)
    assert torch.equal(rows[~real], before[~real])


# ------------------------------------------------------------------------- folded layout


def _folded_plan(T=96, k=4, seed=0, coselected=False):
    """A folded plan over 12 local experts (S = 4, G = 3; global experts 4..7, a whole group,
    on another rank: their slots become padding rows), expert 9 empty; about half the slots
    co-selected within a group when `coselected`."""
    from grove_kernels.plan_folded import build_folded_plan

    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(16) if e != 13])  # global 13 = local 9
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]]
                       for _ in range(T)])
    if coselected:  # slot 1 in slot 0's group
        ids[:, 1] = ids[:, 0] // 4 * 4 + (ids[:, 0] + 1) % 4
        ids[:, 1] = torch.where(ids[:, 1] == 13, ids[:, 0] // 4 * 4 + (ids[:, 0] + 2) % 4,
                                ids[:, 1])
    w = torch.rand(T, k, generator=gen) + 0.1
    emap = torch.tensor([0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7, 8, 9, 10, 11], dtype=torch.int32)
    plan = build_folded_plan(ids.to(DEV), w.to(DEV), 12, 4, 0.5, emap.to(DEV))
    R = plan.num_rows
    r = torch.arange(R, device=DEV)
    e = torch.searchsorted(plan.expert_offsets[1:12].contiguous(), r, right=True)
    real = r < plan.expert_offsets[12]
    lead = real & (r < plan.leader_ends[e.clamp(max=11)])
    assert (~real).any() and (real & ~lead).any() and lead.any()
    return plan, gen, real, lead


FOLDED_I, FOLDED_IA = 96, 32


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("offset", [0, 1], ids=["vector", "misaligned"])
def test_swiglu_folded_forward_and_scale(dtype, offset):
    plan, gen, real, lead = _folded_plan(coselected=True)
    I, Ia, R = FOLDED_I, FOLDED_IA, plan.num_rows
    W, Z = 2 * (I + Ia), I + Ia
    h = _rand(gen, R, W + offset, dtype=dtype, scale=2.0)[:, offset:]
    w, lw = plan.row_weight, plan.leader_weight
    z = torch.full((R, Z + offset), SENTINEL, dtype=dtype, device=DEV)[:, offset:]
    zs = torch.full((R, Z), SENTINEL, dtype=dtype, device=DEV)
    h_zeroed = h.clone()
    lib.swiglu_folded_fwd(h_zeroed, I, plan.expert_offsets, plan.leader_ends, w, lw, z, zs,
                          zero_h=True)
    silu = torch.nn.functional.silu
    hf = h.float()
    ze = silu(hf[:, :I]) * hf[:, I:2 * I]
    za = silu(hf[:, 2 * I:2 * I + Ia]) * hf[:, 2 * I + Ia:]
    _close(z[real, :I], ze[real], dtype)
    _close(z[lead, I:], za[lead], dtype)
    assert (z[real & ~lead, I:] == 0).all() and (z[~real] == SENTINEL).all()
    _close(zs[real, :I], (w[:, None] * ze)[real], dtype)
    _close(zs[lead, I:], (lw[:, None] * za)[lead], dtype)
    assert (zs[real & ~lead, I:] == 0).all() and (zs[~real] == SENTINEL).all()
    assert (h_zeroed[real & ~lead, 2 * I:] == 0).all()
    keep = lead | ~real
    assert torch.equal(h_zeroed[keep], h[keep]) and torch.equal(h_zeroed[:, :2 * I], h[:, :2 * I])
    # Without zero_h, h is only read; z alone, zs alone; bitwise the same values.
    z2 = torch.full_like(z, SENTINEL)
    h_kept = h.clone()
    lib.swiglu_folded_fwd(h_kept, I, plan.expert_offsets, plan.leader_ends, None, None, z2, None)
    assert torch.equal(h_kept, h) and torch.equal(z2, z)
    # scale_folded on the rounded z: in place and out of place alike, zs within rounding.
    zs2 = torch.full((R, Z), SENTINEL, dtype=dtype, device=DEV)
    lib.scale_folded(z, I, plan.expert_offsets, plan.leader_ends, w, lw, zs2)
    lib.scale_folded(z2, I, plan.expert_offsets, plan.leader_ends, w, lw, z2)
    assert torch.equal(z2, zs2) and (zs2[~real] == SENTINEL).all()
    _close(zs2[real], zs[real], dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_swiglu_folded_backward(dtype):
    plan, gen, real, lead = _folded_plan(coselected=True, seed=1)
    I, Ia, R = FOLDED_I, FOLDED_IA, plan.num_rows
    W, Z = 2 * (I + Ia), I + Ia
    h = _rand(gen, R, W, dtype=dtype, scale=2.0)
    g = _rand(gen, R, Z, dtype=dtype)
    g[~lead, I:] = float("nan")  # never read off the leader rows
    w, lw = plan.row_weight, plan.leader_weight
    dh = torch.full((R, W), SENTINEL, dtype=dtype, device=DEV)
    drw = torch.full((R,), SENTINEL, dtype=torch.float32, device=DEV)
    dlw = torch.full((R,), SENTINEL, dtype=torch.float32, device=DEV)
    lib.swiglu_folded_bwd(g, h, I, plan.expert_offsets, plan.leader_ends, w, lw, dh, drw, dlw)
    h64 = h.double().requires_grad_()
    g64 = torch.nan_to_num(g.double())
    silu = torch.nn.functional.silu
    ze = silu(h64[:, :I]) * h64[:, I:2 * I]
    za = silu(h64[:, 2 * I:2 * I + Ia]) * h64[:, 2 * I + Ia:]
    lwm = torch.where(lead, lw, 0.0).double()
    ((ze * g64[:, :I]).sum(1) * w.double() + (za * g64[:, I:]).sum(1) * lwm).sum().backward()
    _close(dh[real], h64.grad[real], dtype)
    assert (dh[real & ~lead, 2 * I:] == 0).all() and (dh[~real] == SENTINEL).all()
    _close(drw[real], (ze.detach() * g64[:, :I]).sum(1)[real], torch.float16)
    _close(dlw[lead], (za.detach() * g64[:, I:]).sum(1)[lead], torch.float16)
    assert (drw[~real] == 0).all() and (dlw[~lead] == 0).all()
    again = [torch.empty_like(t) for t in (dh, drw, dlw)]
    lib.swiglu_folded_bwd(g, h, I, plan.expert_offsets, plan.leader_ends, w, lw, *again)
    assert torch.equal(again[0][real], dh[real]) and torch.equal(again[1], drw)
    assert torch.equal(again[2], dlw)  # deterministic


@pytest.mark.parametrize("kernel", [k for k in GEMM_KERNELS if k.grouped == "m"],
                         ids=[k.name for k in GEMM_KERNELS if k.grouped == "m"])
def test_grouped_gemm_folded_problems(kernel):
    """GEMM-1 / dGEMM-2 / dGEMM-1 of the folded layout: two sections on ONE row buffer, the
    second over the leader prefixes with b_shared = S (problem e reads b[e // S]), writing
    other columns of the same output."""
    plan, gen, real, lead = _folded_plan(coselected=True, seed=2)
    dtype, swiglu, nt = DTYPES[kernel.dtype], kernel.epilogue == SWIGLU, kernel.majors == "nt"
    E, G, S, R, K = 12, 3, 4, plan.num_rows, 256
    N = (192, 64)
    a = _rand(gen, R, K, dtype=dtype)
    b = [_rand(gen, *((P, n, K) if nt else (P, K, n)), dtype=dtype, scale=K ** -0.5)
         for P, n in ((E, N[0]), (G, N[1]))]
    width = [n // 2 for n in N] if swiglu else list(N)
    out = torch.full((R, sum(width)), SENTINEL, dtype=dtype, device=DEV)
    off, ends = plan.expert_offsets, plan.leader_ends
    start = torch.cat([off[:-1], off[:-1] + R])
    count = torch.cat([off[1:] - off[:-1], ends - off[:-1]])
    lib.grouped_gemm([a, a], b, [out[:, :width[0]], out[:, width[0]:]], start, count,
                     kernel.name, b_shared=[1, S])
    torch.cuda.synchronize()
    for e in range(E):
        for s, (r0, r1) in enumerate([(off[e], off[e + 1]), (off[e], ends[e])]):
            r0, r1 = int(r0), int(r1)
            if r1 == r0:
                continue
            wt = b[s][e if s == 0 else e // S].float()
            ref = a[r0:r1].float() @ (wt.t() if nt else wt)
            ref = _swiglu_halves(ref) if swiglu else ref
            cols = slice(0, width[0]) if s == 0 else slice(width[0], None)
            got = out[r0:r1, cols].float()
            assert (got - ref).norm() <= 1e-2 * max(ref.norm(), 1e-6), (kernel.name, e, s)
    assert (out[~real] == SENTINEL).all()
    assert (out[real & ~lead, width[0]:] == SENTINEL).all()  # no adjugate off the leaders
