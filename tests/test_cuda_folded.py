"""The `cuda` backend on the folded adjugate layout (grove_kernels/cuda/folded.py), on the CPU:
its dataflow against the float64 oracle, with the kernels replaced by stand-ins.

    grouped GEMMs   where grove_kernels._C is built (nvcc + CUTLASS; it imports under CPU
                    torch), the stand-in asks the extension for the argument buffer the device
                    fill would write (grouped_gemm_args: the same bindings and the same fill
                    function, run on the host) and executes every problem from those raw
                    shapes, addresses and leading dimensions, checking that each operand lies
                    inside its section's tensor: plan -> CUTLASS problems is tested for real.
                    Without the extension: a stand-in written from csrc/include/grove_cuda.h.
    row kernels     stand-ins written from csrc/include/grove_elementwise.h (folded section)
                    and the sections ones of test_cuda_dataflow.py.
Buffers are poisoned with NaN by the stand-ins' allocator: reading a row no kernel wrote, or
an adjugate column of a row that leads no group, shows up as a NaN.
What this cannot prove: that the CUDA kernels honour the contracts (tests/test_cuda_ops_gpu.py
and tests/test_api_gpu.py, on an sm_90 GPU).
"""
import pytest
import torch

import oracle
import test_cuda_dataflow as sections_df
from helpers import make_grove, rel_err, routing, to64
from test_cuda_dataflow import CALLS, stand_ins  # noqa: F401  (fixture)

from grove_kernels.settings import Settings
from grove_kernels import experts as experts_stage
from grove_kernels.cuda import backend as cuda_backend
from grove_kernels.cuda import folded as cuda_folded
from grove_kernels.cuda import ext as lib
from grove_kernels.cuda import packed
from grove_kernels.experts import Weights
from grove_kernels.plan_folded import build_folded_plan

LAM = 0.5
# The extension imports here (test_cuda_build.py checks that its ops are this tree's): use its
# host fill.
REAL_FILL = "grouped_gemm_args" in lib.registered_ops()


def _round(t, like):
    return t.to(like.dtype)


# ------------------------------------------------------------------ GEMMs from the real fill

def _flat(t):
    """A 1-D tensor over t's whole storage (the addresses the kernels see)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,))


def _operand(t, addr, shape, stride, what):
    """The [shape] view at raw address `addr` with `stride`, asserted to lie inside view t."""
    base = t.untyped_storage().data_ptr()
    offset, rem = divmod(addr - base, t.element_size())
    assert rem == 0 and offset >= 0, f"{what}: address outside its tensor's storage"
    n = t.untyped_storage().nbytes() // t.element_size()
    idx = torch.arange(n)
    if any(s == 0 for s in shape):
        return torch.as_strided(_flat(t), shape, stride, 0)
    want = torch.as_strided(idx, shape, stride, offset).flatten()
    assert want.max() < n, f"{what}: past the end of its storage"
    mine = torch.as_strided(idx, t.shape, t.stride(), t.storage_offset()).flatten()
    assert torch.isin(want, mine).all(), f"{what}: elements outside its section's tensor"
    return torch.as_strided(_flat(t), shape, stride, offset)


def _scaled(z, row_scale, s, rows):
    """z [M, N] times the row scales of section s's rows (swiglu_epilogue.cuh), or z."""
    return z if row_scale is None else z * row_scale[s][rows].float()[:, None]


def _fill_gemm(a, b, out, start, count, kernel, *, b_shared=None, row_scale=None):
    """Run every problem from the argument buffer the real fill writes (grove_cuda.h)."""
    CALLS.append(kernel)
    grouped, majors, swiglu = sections_df._kind(kernel)
    assert row_scale is None or swiglu
    shared = list(b_shared or [1] * len(a))
    args = lib.grouped_gemm_args(a, b, out, start.cpu(), count.cpu(), kernel, shared)
    per_section = [o.shape[0] if grouped == "k" else bb.shape[0] * sh
                   for o, bb, sh in zip(out, b, shared)]
    s, first = 0, 0
    for p in range(start.numel()):
        while p >= first + per_section[s]:
            first += per_section[s]
            s += 1
        M, N, K = args["shapes"][p].tolist()
        lda, ldb, ldd = args["ld"][p].tolist()
        pa, pb, pd = (int(args[n][p]) for n in "abd")
        what = f"{kernel} problem {p} (section {s})"
        if grouped == "k":
            if K == 0:  # zeroed by grove_grouped_zero_empty, from the same clamped rows
                assert M == 0
                _operand(out[s], pd, (out[s].shape[1], N), (ldd, 1), what + " D").zero_()
                continue
            A = _operand(a[s], pa, (K, M), (lda, 1), what + " A")
            B = _operand(b[s], pb, (K, N), (ldb, 1), what + " B")
            D = _operand(out[s], pd, (M, N), (ldd, 1), what + " D")
            D.copy_(_round(A.float().t() @ B.float(), D))
            continue
        if M == 0:
            continue
        A = _operand(a[s], pa, (M, K), (lda, 1), what + " A").float()
        if majors == "nt":
            B = _operand(b[s], pb, (N, K), (ldb, 1), what + " B").float().t()
        else:
            B = _operand(b[s], pb, (K, N), (ldb, 1), what + " B").float()
        acc = A @ B
        width = N // 2 if swiglu else N
        D = _operand(out[s], pd, (M, width), (ldd, 1), what + " D")
        if swiglu:  # the epilogue finds the problem's first row from its D pointer
            row0 = (pd - out[s].data_ptr()) // out[s].element_size() // ldd
            acc = _scaled(sections_df._swiglu_halves(acc), row_scale, s, slice(row0, row0 + M))
        D.copy_(_round(acc, D))
    return out


def _contract_gemm(a, b, out, start, count, kernel, *, b_shared=None, row_scale=None):
    """grove_cuda.h without the extension: section s's rows count from R_0 + ... + R_{s-1};
    B_p of an m-grouped problem j is b[s][j // b_shared[s]]."""
    CALLS.append(kernel)
    grouped, majors, swiglu = sections_df._kind(kernel)
    assert row_scale is None or swiglu
    shared = list(b_shared or [1] * len(a))
    base, first, bounds = 0, 0, []
    for s in range(len(a)):
        P = out[s].shape[0] if grouped == "k" else b[s].shape[0] * shared[s]
        bounds.append((base, first, P))
        base += a[s].shape[0]
        first += P
    for p, (st, c) in enumerate(zip(start.tolist(), count.tolist())):
        s = max(i for i, (_, f, _) in enumerate(bounds) if p >= f)
        row_base, f, _ = bounds[s]
        j, rows = p - f, slice(st - row_base, st - row_base + c)
        A = a[s][rows].float()
        if grouped == "k":
            out[s][j] = _round(A.t() @ b[s][rows].float(), out[s])
        elif c:
            B = b[s][j // shared[s]].float()
            acc = A @ (B.t() if majors == "nt" else B)
            if swiglu:
                acc = _scaled(sections_df._swiglu_halves(acc), row_scale, s, rows)
            out[s][rows] = _round(acc, out[s])
    return out


# ------------------------------------------------------------- folded row kernels (contract)

def _rows(offsets, leader_ends, R):
    """(real [R], lead [R]) of grove_elementwise.h's folded section."""
    r = torch.arange(R)
    E = leader_ends.numel()
    e = (torch.searchsorted(offsets[1:E].contiguous(), r, right=True)).clamp(max=E - 1)
    real = r < offsets[E].clamp(0, R)
    return real, real & (r >= offsets[e]) & (r < leader_ends[e])


def _swiglu_folded_fwd(h, I, offsets, leader_ends, row_weight, leader_weight, z, zs,
                       zero_h=False):
    R, Ia = h.shape[0], h.shape[1] // 2 - I
    real, lead = _rows(offsets, leader_ends, R)
    hf = h.float()
    silu = torch.nn.functional.silu
    ze = silu(hf[:, :I]) * hf[:, I:2 * I]
    za = torch.where(lead[:, None], silu(hf[:, 2 * I:2 * I + Ia]) * hf[:, 2 * I + Ia:], 0.0)
    if z is not None:
        z[real] = _round(torch.cat([ze, za], 1), z)[real]
    if zs is not None:
        lw = torch.where(lead, leader_weight, 0.0)[:, None]
        zs[real] = _round(torch.cat([row_weight[:, None] * ze, lw * za], 1), zs)[real]
    if zero_h:
        h[real & ~lead, 2 * I:] = 0
    return z, zs


def _scale_folded(z, I, offsets, leader_ends, row_weight, leader_weight, zs):
    real, lead = _rows(offsets, leader_ends, z.shape[0])
    zf = z.float()
    za = torch.where(lead[:, None], leader_weight[:, None] * zf[:, I:], 0.0)
    zs[real] = _round(torch.cat([row_weight[:, None] * zf[:, :I], za], 1), zs)[real]
    return zs


def _swiglu_folded_bwd(g, h, I, offsets, leader_ends, row_weight, leader_weight, dh,
                       d_row_weight, d_leader_weight):
    R, Ia = g.shape[0], g.shape[1] - I
    real, lead = _rows(offsets, leader_ends, R)
    parts = []
    sums = []
    for (g0, n, h0), w in (((0, I, 0), row_weight), ((I, Ia, 2 * I), leader_weight)):
        gv = g[:, g0:g0 + n].float()
        gate, up = h[:, h0:h0 + n].float(), h[:, h0 + n:h0 + 2 * n].float()
        s = torch.sigmoid(gate)
        parts += [w[:, None] * gv * up * s * (1 + gate * (1 - s)), w[:, None] * gv * gate * s]
        sums.append((gv * gate * s * up).sum(1))
    adj = torch.cat(parts[2:], 1)
    dhv = torch.cat(parts[:2] + [torch.where(lead[:, None], adj, 0.0)], 1)
    dh[real] = _round(dhv, dh)[real]
    d_row_weight.copy_(torch.where(real, sums[0], 0.0))
    d_leader_weight.copy_(torch.where(lead, sums[1], 0.0))
    return dh


@pytest.fixture
def folded(stand_ins, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lib, "grouped_gemm", _fill_gemm if REAL_FILL else _contract_gemm)
    for name, fn in [("swiglu_folded_fwd", _swiglu_folded_fwd),
                     ("scale_folded", _scale_folded), ("swiglu_folded_bwd", _swiglu_folded_bwd)]:
        monkeypatch.setattr(lib, name, fn)
    packed.packed_down.clear()
    yield
    packed.packed_down.clear()


# ------------------------------------------------------------------------------ dataflow

GRADS = ["x", "w1", "w2", "a1", "a2", "topk_weights"]
SHAPE = dict(H=32, E=8, I=24, Ia=16)


def _case(gen, T, k, S, kind, dtype=torch.bfloat16, emap=None, E=SHAPE["E"]):
    p = make_grove(T, SHAPE["H"], E, SHAPE["I"], SHAPE["Ia"], S, gen, dtype)
    w, ids = routing(T, E, k, gen, kind, S)
    return p, w, ids


def _run(p, w, ids, S, emap=None, save=True):
    weights = Weights(p["w1"], p["w2"], p["a1"], p["a2"])
    plan = build_folded_plan(ids, w, p["w1"].shape[0], S, LAM, emap)
    y, saved = experts_stage.forward(cuda_backend, p["x"], weights, plan, False, save,
                                     emap is not None)
    if not save:
        return y, None, None, None
    kept = [t.clone() for t in saved]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    T, k = ids.shape
    plan2, act = experts_stage.unflatten_saved(saved, T, k, weights, "folded")
    grads = experts_stage.backward(cuda_backend, dy, p["x"], weights, plan2, act, False, LAM,
                                   w.dtype)
    assert all(torch.equal(a, b) for a, b in zip(saved, kept))  # saved is read only
    return y, dy, grads, saved


def _reference(p, w, ids, dy, S):
    leaves = [to64(t, True) for t in (p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w)]
    y = oracle.grove_layer(*leaves[:5], leaves[5], ids, S, LAM)
    if dy is None:
        return y, None
    return y, torch.autograd.grad(y, leaves, to64(dy))


def _check(y, grads, ref_y, ref_g):
    assert rel_err(y, ref_y) <= 2e-2, "y"
    for name, got, ref in zip(GRADS, grads or [], ref_g or []):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, ref) <= 2e-2, name


GRID = [  # (T, k, S, kind)
    (1, 4, 2, "random"), (13, 4, 2, "random"), (13, 4, 2, "coselected"), (13, 4, 2, "sparse"),
    (13, 4, 2, "one_expert"), (13, 1, 2, "random"), (13, 4, 1, "random"), (13, 4, 4, "random"),
    (13, 4, 4, "coselected"), (7, 8, 4, "coselected"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T, k, S, kind", GRID, ids=[f"T{t}k{k}S{s}-{n}" for t, k, s, n in GRID])
def test_folded_dataflow_matches_oracle(folded, gen, T, k, S, kind, dtype):
    p, w, ids = _case(gen, T, k, S, kind, dtype)
    CALLS.clear()
    y, dy, grads, saved = _run(p, w, ids, S)
    # forward: GEMM-1 and GEMM-2; backward: dGEMM-2, dW2/dA2, dW1/dA1, dGEMM-1: one launch each
    assert [sections_df._kind(c)[:2] for c in CALLS] == [
        ("m", "nt"), ("m", "nt"), ("m", "nn"), ("k", "tn"), ("k", "tn"), ("m", "nn")]
    _check(y, grads, *_reference(p, w, ids, dy, S))


def test_saved_activations_follow_the_folded_layout(folded, gen):
    S, T, k = 2, 13, 4
    p, w, ids = _case(gen, T, k, S, "coselected")
    _, _, _, saved = _run(p, w, ids, S)
    plan = build_folded_plan(ids, w, SHAPE["E"], S, LAM)
    h, z = saved[-2:]
    I, Ia, R = SHAPE["I"], SHAPE["Ia"], T * k
    assert h.shape == (R, 2 * (I + Ia)) and z.shape == (R, I + Ia)
    assert not h.isnan().any() and not z.isnan().any()
    _, lead = _rows(plan.expert_offsets, plan.leader_ends, R)
    assert 0 < lead.sum() < R  # coselected: some rows lead no group
    assert (h[~lead, 2 * I:] == 0).all() and (z[~lead, I:] == 0).all()
    assert (h[lead, 2 * I:] != 0).any(1).all()
    # z is unscaled: silu(gate) * up of h, rounded once
    hf = h.float()
    ze = torch.nn.functional.silu(hf[:, :I]) * hf[:, I:2 * I]
    assert rel_err(z[:, :I], ze.double()) <= 1e-2


def test_expert_map_and_empty_experts(folded, gen):
    S, T, k = 2, 13, 4
    E = SHAPE["E"]
    emap = torch.tensor([0, 1, -1, -1, 2, 3, 4, 5], dtype=torch.int32)  # group 1 elsewhere
    p = make_grove(T, SHAPE["H"], 6, SHAPE["I"], SHAPE["Ia"], S, gen, torch.bfloat16)
    w, ids = routing(T, E, k, gen, "random", S)
    y, dy, grads, saved = _run(p, w, ids, S, emap)
    assert not any(t.isnan().any() for t in saved if t.is_floating_point())
    # The oracle on local ids, the skipped slots (experts of another rank) at weight 0.
    local = emap.long()[ids.long()]
    on_rank = local >= 0
    assert (~on_rank).any() and on_rank.any()
    leaves = [to64(t, True) for t in (p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w)]
    w_local = leaves[5] * on_rank
    ref_y = oracle.grove_layer(*leaves[:5], w_local, local.clamp(min=0), S, LAM)
    ref_g = torch.autograd.grad(ref_y, leaves, to64(dy))
    _check(y, grads, ref_y, ref_g)


def test_empty_experts_and_groups_get_zero_gradients(folded, gen):
    S, T, k = 2, 13, 2
    p, w, ids = _case(gen, T, k, S, "sparse")
    ids = ids.clamp(max=3)  # experts 4.. and groups 2.. have no rows
    ids[:, 1] = (ids[:, 0] + 1) % 4
    _, _, (dx, dw1, dw2, da1, da2, dtw), _ = _run(p, w, ids, S)
    assert (dw1[4:] == 0).all() and (dw2[4:] == 0).all()
    assert (da1[2:] == 0).all() and (da2[2:] == 0).all()
    assert torch.isfinite(dx).all() and torch.isfinite(dtw).all()


def test_float64_router_weights(folded, gen):
    p, w, ids = _case(gen, 13, 4, 2, "random")
    y, dy, grads, _ = _run(p, w.double(), ids, 2)
    ref_y, ref_g = _reference(p, w.double(), ids, dy, 2)
    assert grads[-1].dtype == torch.float64
    _check(y, grads, ref_y, ref_g)


@pytest.mark.parametrize("kind", ["random", "coselected"])
def test_fused_swiglu_inference(folded, gen, monkeypatch, kind):
    monkeypatch.setattr(Settings, "fuse_swiglu", True)
    p, w, ids = _case(gen, 13, 4, 2, kind)
    CALLS.clear()
    y = _run(p, w, ids, 2, save=False)[0]
    assert "swiglu" in CALLS[0] and [sections_df._kind(c)[:2] for c in CALLS] == [
        ("m", "nt"), ("m", "nt")]
    assert rel_err(y, _reference(p, w, ids, None, 2)[0]) <= 2e-2


def test_inference_packs_the_down_projection_once(folded, gen):
    p, w, ids = _case(gen, 13, 4, 2, "random")
    y1 = _run(p, w, ids, 2, save=False)[0]
    (entry,) = packed.packed_down._entries.values()
    y2 = _run(p, w, ids, 2, save=False)[0]
    assert packed.packed_down._entries[next(iter(packed.packed_down._entries))] is entry
    assert torch.equal(y1, y2)  # deterministic
    with torch.no_grad():
        p["a2"].mul_(2)  # versioned in-place update: repacked
    y3 = _run(p, w, ids, 2, save=False)[0]
    assert not torch.equal(y1, y3)
    assert rel_err(y3, _reference(p, w, ids, None, 2)[0]) <= 2e-2


def test_training_packs_once_per_weight_version(folded, gen):
    """A training loop packs [W2 | A2] once per optimizer step: forwards of one step (micro-
    batches, recomputes) share the copy, the step's in-place update makes a new one."""
    p, w, ids = _case(gen, 13, 4, 2, "coselected")
    y1, _, g1, _ = _run(p, w, ids, 2, save=True)
    (entry,) = packed.packed_down._entries.values()
    y2, _, g2, _ = _run(p, w, ids, 2, save=True)
    (again,) = packed.packed_down._entries.values()
    assert again is entry  # not repacked
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    for name in ("w2", "a2"):  # an optimizer step: versioned in-place updates
        with torch.no_grad():
            p[name].sub_(0.5 * torch.randn(p[name].shape, generator=gen).to(p[name].dtype))
        y3, dy, g3, _ = _run(p, w, ids, 2, save=True)
        (fresh,) = packed.packed_down._entries.values()
        assert fresh is not entry and fresh[2] is not entry[2]
        entry = fresh
        assert not torch.equal(y1, y3)
        _check(y3, g3, *_reference(p, w, ids, dy, 2))


def _spy_gemms(monkeypatch):
    """[(grouped, majors), [storage of each b], [out tensors]] of every grouped GEMM."""
    seen = []
    inner = lib.grouped_gemm

    def spy(a, b, out, start, count, kernel, **kw):
        seen.append((sections_df._kind(kernel)[:2], [t.untyped_storage().data_ptr() for t in b],
                     list(out)))
        return inner(a, b, out, start, count, kernel, **kw)

    monkeypatch.setattr(lib, "grouped_gemm", spy)
    return seen


@pytest.mark.parametrize("kind", ["random", "coselected"])
def test_captured_training_forward_does_not_pack(folded, gen, monkeypatch, kind):
    """Under CUDA-graph capture a training forward neither packs (the pack would run on every
    replay) nor reads a pinned copy (the optimizer's updates would be missed): GEMM-2 reads w2
    and a2 as stored, the leader rows' adjugate term into rows R.. of o, added by the combine.
    An inference forward still reads the copy an eager call made."""
    p, w, ids = _case(gen, 13, 4, 2, kind)
    _run(p, w, ids, 2, save=False)
    (entry,) = packed.packed_down._entries.values()
    monkeypatch.setattr(packed, "_capturing", lambda t: True)
    packs = []
    monkeypatch.setattr(cuda_folded, "pack_down", lambda *a: packs.append(a))
    seen = _spy_gemms(monkeypatch)
    y, dy, grads, _ = _run(p, w, ids, 2, save=True)
    assert not packs and not packed.packed_down._pinned
    assert packed.packed_down._entries[next(iter(packed.packed_down._entries))] is entry
    gemm2 = [s for s in seen if s[0] == ("m", "nt")][1]
    assert gemm2[1] == [p[n].untyped_storage().data_ptr() for n in ("w2", "a2")]
    R = ids.numel()
    o = gemm2[2][0]
    assert o.untyped_storage().nbytes() == 2 * R * SHAPE["H"] * o.element_size()
    _check(y, grads, *_reference(p, w, ids, dy, 2))
    _run(p, w, ids, 2, save=False)
    assert len(packed.packed_down._pinned) == 1 and packed.packed_down._pinned[0] is entry[2]


def test_backward_dx_rows_reuse_the_gathered_rows(folded, gen, monkeypatch):
    """dGEMM-1 writes dxr [2R, H] (expert term of every row, adjugate term of the leader
    rows) into the one buffer that held xg and dyg: no allocation of its own."""
    p, w, ids = _case(gen, 13, 4, 2, "coselected")
    gathers = []
    inner = lib.gather_rows

    def spy(src, *args):
        gathers.append(args[-1])
        return inner(src, *args)

    monkeypatch.setattr(lib, "gather_rows", spy)
    seen = _spy_gemms(monkeypatch)
    y, dy, grads, _ = _run(p, w, ids, 2, save=True)
    _check(y, grads, *_reference(p, w, ids, dy, 2))
    R, H = ids.numel(), SHAPE["H"]
    xg, dyg = gathers[-2:]  # the backward's two gathers
    storage = xg.untyped_storage()
    assert dyg.untyped_storage().data_ptr() == storage.data_ptr()
    assert storage.nbytes() == 2 * R * H * xg.element_size()
    assert (xg.storage_offset(), dyg.storage_offset()) == (0, R * H)
    dgemm1 = [s for s in seen if s[0] == ("m", "nn")][-1]
    assert [(o.untyped_storage().data_ptr(), o.storage_offset(), tuple(o.shape))
            for o in dgemm1[2]] == [(storage.data_ptr(), 0, (R, H)),
                                     (storage.data_ptr(), R * H, (R, H))]


def test_gemm2_reads_the_packed_copy_not_w2(folded, gen, monkeypatch):
    """Every GEMM-2 problem reads [W2_e | A2_g] (the non-leader rows its first I columns), so
    the forward's GEMMs never read w2; the backward's dGEMM-2 does (nn, as stored)."""
    seen = []
    inner = lib.grouped_gemm

    def spy(a, b, out, start, count, kernel, **kw):
        seen.append((sections_df._kind(kernel)[:2], [t.untyped_storage().data_ptr() for t in b]))
        return inner(a, b, out, start, count, kernel, **kw)

    monkeypatch.setattr(lib, "grouped_gemm", spy)
    p, w, ids = _case(gen, 13, 4, 2, "coselected")
    for save in (False, True):
        seen.clear()
        _run(p, w, ids, 2, save=save)
        w2 = p["w2"].untyped_storage().data_ptr()
        forward = [s for s in seen if s[0] == ("m", "nt")]
        assert len(forward) == 2 and all(w2 not in ptrs for _, ptrs in forward)
        (entry,) = packed.packed_down._entries.values()
        assert forward[1][1] == [entry[2].untyped_storage().data_ptr()] * 2


@pytest.mark.skipif(not REAL_FILL, reason="needs grove_kernels._C (nvcc + CUTLASS) for the fill")
def test_fill_of_gemm2_on_the_packed_copy(gen):
    """The non-leader problems: B = the packed copy's expert block, ldb = I + Ia, K = I."""
    S, E, H, I, Ia = 2, SHAPE["E"], SHAPE["H"], SHAPE["I"], SHAPE["Ia"]
    p, w, ids = _case(gen, 13, 4, S, "coselected")
    plan = build_folded_plan(ids, w, E, S, LAM)
    R, Z = plan.num_rows, I + Ia
    down = packed.pack_down(p["w2"], p["a2"])
    zs = torch.zeros(R, Z, dtype=torch.bfloat16)
    o = torch.zeros(R, H, dtype=torch.bfloat16)
    off, ends = plan.expert_offsets, plan.leader_ends
    start = torch.cat([off[:-1], ends + R])
    count = torch.cat([ends - off[:-1], off[1:] - ends])
    kernel = lib.gemm_kernel(torch.bfloat16, "m", "nt", schedule="coop")
    args = lib.grouped_gemm_args([zs, zs[:, :I]], [down, down[:, :, :I]], [o, o], start, count,
                                 kernel, [1, 1])
    block = [down.data_ptr() + j * H * Z * down.element_size() for j in range(E)]
    assert args["b"].tolist() == block * 2
    assert (args["ld"][:, 1] == Z).all()
    assert args["shapes"][:E, 2].tolist() == [Z] * E and args["shapes"][E:, 2].tolist() == [I] * E
    assert args["shapes"][:, 1].tolist() == [H] * 2 * E
    assert args["shapes"][:, 0].tolist() == count.tolist()


@pytest.mark.skipif(not REAL_FILL, reason="needs grove_kernels._C (nvcc + CUTLASS) for the fill")
def test_fill_rejects_bad_b_shared(gen):
    p, w, ids = _case(gen, 5, 2, 2, "random")
    plan = build_folded_plan(ids, w, SHAPE["E"], 2, LAM)
    R, E = plan.num_rows, SHAPE["E"]
    xg = torch.zeros(R, SHAPE["H"], dtype=torch.bfloat16)
    h = torch.zeros(R, 2 * (SHAPE["I"] + SHAPE["Ia"]), dtype=torch.bfloat16)
    I = SHAPE["I"]
    start = torch.zeros(2 * E, dtype=torch.int64)
    kernel = lib.gemm_kernel(torch.bfloat16, "m", "nt", schedule="coop")
    args = lib.grouped_gemm_args([xg, xg], [p["w1"], p["a1"]], [h[:, :2 * I], h[:, 2 * I:]],
                                 start, start.clone(), kernel, [1, 2])
    assert (args["shapes"][:, 0] == 0).all()  # no rows: M = 0, nothing scheduled
    # the adjugate problems of experts 2j and 2j + 1 read a1[j]
    base, step = p["a1"].data_ptr(), p["a1"].stride(0) * 2
    assert args["b"][E:].tolist() == [base + (j // 2) * step for j in range(E)]
    with pytest.raises(RuntimeError, match="one entry per problem"):
        lib.grouped_gemm_args([xg, xg], [p["w1"], p["a1"]], [h[:, :2 * I], h[:, 2 * I:]],
                              start, start.clone(), kernel, [1, 1])
    with pytest.raises(RuntimeError, match=r"b_shared\[1\] must be >= 1"):
        lib.grouped_gemm_args([xg, xg], [p["w1"], p["a1"]], [h[:, :2 * I], h[:, 2 * I:]],
                              start, start.clone(), kernel, [1, 0])


# ------------------------------------------------------ on an sm_90 GPU (marked gpu, real ops)

GPU_SHAPE = dict(T=64, H=256, E=16, I=96, Ia=32, k=4, S=2)


def _gpu_case(gen, kind):
    import grove_kernels.cuda as cuda_pkg

    if not (torch.cuda.is_available() and cuda_pkg.is_available()):
        pytest.skip("needs grove_kernels._C and an sm_90 GPU")
    c = GPU_SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, torch.bfloat16, "cuda")
    for t in p.values():
        t.requires_grad_(True)
    w, ids = routing(c["T"], c["E"], c["k"], gen, kind, c["S"], device="cuda")
    return p, w, ids.to(torch.int32)


def _gpu_call(p, w, ids):
    import grove_kernels as gk

    return gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                                  group_size=GPU_SHAPE["S"], adjugate_scale=LAM)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "coselected"])
def test_gpu_captured_training_forward_follows_weight_updates(gen, monkeypatch, kind):
    """A training forward (weights require grad) captured in a CUDA graph reads w2 / a2 as
    stored: replays after in-place updates of w2 and a2 (an optimizer step) follow them, and
    agree with an eager call to the output rounding."""
    import grove_kernels as gk

    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")
    p, w, ids = _gpu_case(gen, kind)
    with gk.use_backend("cuda"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _gpu_call(p, w, ids)  # warm-up (packs for eager calls)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = _gpu_call(p, w, ids)
        for step in range(3):
            graph.replay()
            torch.cuda.synchronize()
            ref = oracle.grove_layer(*(to64(p[n]) for n in ("x", "w1", "w2", "a1", "a2")),
                                     to64(w), ids.cpu(), GPU_SHAPE["S"], LAM)
            assert rel_err(y, ref) <= 2e-2, f"replay {step}"
            assert rel_err(y, _gpu_call(p, w, ids)) <= 1e-2, f"replay {step} vs eager"
            with torch.no_grad():
                p["w2"].mul_(-1.25)
                p["a2"].add_(0.5 * torch.randn_like(p["a2"]))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "coselected", "one_expert"])
def test_gpu_folded_gradients_with_dx_in_the_gathered_rows(gen, monkeypatch, kind):
    """The folded backward's dxr [2R, H] reuses the storage of xg and dyg: every gradient
    against float64, with the allocator's free blocks poisoned first."""
    import grove_kernels as gk

    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")
    p, w, ids = _gpu_case(gen, kind)
    w.requires_grad_(True)
    blocks = [torch.full((16 << 20,), float("nan"), device="cuda") for _ in range(4)]
    del blocks
    with gk.use_backend("cuda"):
        y = _gpu_call(p, w, ids)
        dy = torch.randn_like(y)
        y.backward(dy)
    names = ("x", "w1", "w2", "a1", "a2")
    leaves = [to64(p[n], True) for n in names] + [to64(w, True)]
    ref = oracle.grove_layer(*leaves, ids.cpu(), GPU_SHAPE["S"], LAM)
    ref.backward(to64(dy))
    assert rel_err(y, ref) <= 2e-2
    for name, got, want in zip(names + ("topk_weights",),
                               [p[n].grad for n in names] + [w.grad], [t.grad for t in leaves]):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) <= 2e-2, name
