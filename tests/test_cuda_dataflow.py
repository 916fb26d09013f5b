"""The `cuda` backend's dataflow (grove_kernels/cuda/backend.py, run through the shared
experts stage of grove_kernels/experts.py) on the CPU, with its kernels replaced by torch
stand-ins written from the contracts of the csrc/include headers (not from the backend's code).

What this proves without a GPU: the stages are wired right (operands, layouts tn/tt/nt,
segments, which row weight is applied where, the plan's real-row ends, d topk_weights), so
the forward and every gradient match the float64 oracle. What it cannot prove: that the
CUDA kernels honour those contracts (tests/test_cuda_ops_gpu.py, on an sm_90 GPU). Buffers the
contracts leave unwritten (padding rows) are filled with NaN by the stand-ins' allocator, so
reading one shows up as a NaN.
"""
import pytest
import torch

import grove_kernels as gk
import oracle
from helpers import make_grove, rel_err, routing, to64

from grove_kernels import experts as experts_stage  # noqa: E402
from grove_kernels.cuda import backend as cuda_backend  # noqa: E402
from grove_kernels.cuda import ext as lib  # noqa: E402
from grove_kernels.experts import Weights  # noqa: E402
from grove_kernels.plan import build_plan  # noqa: E402
from grove_kernels.settings import Settings  # noqa: E402
import grove_kernels.settings as settings_module  # noqa: E402

if lib.is_available():  # a real sm_90 device: the GPU tests cover the real kernels
    pytest.skip("stand-ins only where the kernels cannot run", allow_module_level=True)


def _round(t, like):
    return t.to(like.dtype)


CALLS = []  # kernels of the grouped GEMMs run by the stand-in, in order


def _kind(kernel):
    """(grouped, majors, swiglu) of a kernel name sm90_<dt>_<m|k>_grouped_<majors>[_swiglu]_..."""
    parts = kernel.split("_")
    return parts[2], parts[4], parts[5] == "swiglu"


def _swiglu_halves(acc):
    """grove_cuda.h, M_GROUPED_NT_SWIGLU: D[m, j] = silu(acc[m, j]) * acc[m, N/2 + j] (b's gate
    rows, then its up rows, as stored)."""
    gate, up = acc.chunk(2, dim=1)
    return torch.nn.functional.silu(gate) * up


def _grouped_gemm(a, b, out, start, count, kernel):
    CALLS.append(kernel)
    grouped, majors, swiglu = _kind(kernel)
    layout = {("m", "nt"): "tn", ("m", "nn"): "tt", ("k", "tn"): "nt"}[(grouped, majors)]
    base, P0 = 0, 0
    bounds = []
    for s in range(len(a)):
        P = out[s].shape[0] if layout == "nt" else b[s].shape[0]
        bounds.append((base, P0, P))
        base += a[s].shape[0]
        P0 += P
    assert start.numel() == P0 == count.numel()
    for p, (st, c) in enumerate(zip(start.tolist(), count.tolist())):
        s = max(i for i, (_, first, _) in enumerate(bounds) if p >= first)
        row_base, first, _ = bounds[s]
        j, rows = p - first, slice(st - row_base, st - row_base + c)
        A = a[s][rows].float()
        if layout == "nt":
            out[s][j] = _round(A.t() @ b[s][rows].float(), out[s])  # zeros when no rows
        elif c:
            B = b[s][j].float()
            acc = A @ (B.t() if layout == "tn" else B)
            out[s][rows] = _round(_swiglu_halves(acc) if swiglu else acc, out[s])
    return out


def _real(n_rows, end):
    return torch.arange(n_rows) < (n_rows if end is None else int(end))


def _real2(R, rows_e, end_e, end_a):
    return torch.cat([_real(rows_e, end_e), _real(R - rows_e, end_a)])


def _gather_rows(x, row_token, row_weight, rows_e, end_e, end_a, out):
    assert row_weight is None or row_weight.dtype == torch.float32
    real = _real2(out.shape[0], rows_e, end_e, end_a)
    v = x[row_token].float()
    if row_weight is not None:
        v = v * row_weight[:, None]
    out[real] = _round(v, out)[real]
    return out


def _swiglu_fwd(h, end, out):
    N = out.shape[1]
    real = _real(out.shape[0], end)
    out[real] = _round(torch.nn.functional.silu(h[:, :N].float()) * h[:, N:].float(), out)[real]
    return out


def _swiglu_bwd(g, h, row_weight, end, dh, d_row_weight):
    assert row_weight is None or row_weight.dtype == torch.float32
    N = g.shape[1]
    real = _real(g.shape[0], end)
    gate, up, gv = h[:, :N].float(), h[:, N:].float(), g.float()
    w = row_weight[:, None] if row_weight is not None else 1.0
    s = torch.sigmoid(gate)
    d_gate = w * gv * up * s * (1 + gate * (1 - s))
    d_up = w * gv * gate * s
    dh[real] = _round(torch.cat([d_gate, d_up], 1), dh)[real]
    if d_row_weight is not None:
        d_row_weight.copy_(torch.where(real, (gv * gate * s * up).sum(1), 0.0))
    return dh


def _combine_rows(rows, token_rows, token_mask, token_weight, out):
    assert token_weight is None or token_weight.dtype == torch.float32
    v = torch.where(token_mask[..., None], rows.float()[token_rows], 0.0)  # masked: skipped
    if token_weight is not None:
        v = v * token_weight[..., None]
    out.copy_(_round(v.sum(1), out))
    return out


def _rows_dot_scale(rows, x, row_token, row_weight, rows_e, end_e, end_a, dot):
    assert row_weight.dtype == torch.float32
    real = _real2(rows.shape[0], rows_e, end_e, end_a)
    if dot is not None:
        d = (rows.float() * x[row_token].float()).sum(1)
        dot.copy_(torch.where(real, d, 0.0))
    rows[real] = _round(rows.float() * row_weight[:, None], rows)[real]
    return rows


@pytest.fixture
def stand_ins(monkeypatch):
    for name, fn in [("grouped_gemm", _grouped_gemm), ("gather_rows", _gather_rows),
                     ("swiglu_fwd", _swiglu_fwd), ("swiglu_bwd", _swiglu_bwd),
                     ("combine_rows", _combine_rows), ("rows_dot_scale", _rows_dot_scale)]:
        monkeypatch.setattr(lib, name, fn)
    real_empty = torch.Tensor.new_empty

    def poisoned(t):  # what a kernel leaves unwritten reads as NaN
        return t.fill_(float("nan")) if t.is_floating_point() else t

    CALLS.clear()
    real_empty_like, real_torch_empty = torch.empty_like, torch.empty
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *size, **kw: poisoned(real_empty(self, *size, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: poisoned(real_empty_like(t, **kw)))
    monkeypatch.setattr(torch, "empty", lambda *size, **kw: poisoned(real_torch_empty(*size, **kw)))


LAM = 0.5
SHAPE = dict(T=13, H=32, E=8, I=24, Ia=16, k=4, S=2)
GRADS = ["x", "w1", "w2", "a1", "a2", "topk_weights"]


def _forward_op(x, w1, w2, a1, a2, w, ids, emap, S, on_input, save=False):
    """What grove::experts_forward runs for the cuda backend: torch plan, shared skeleton."""
    weights = Weights(w1, w2, a1, a2)
    plan = build_plan(ids, w, w1.shape[0], S if a1 is not None else 0, LAM, emap)
    return experts_stage.forward(cuda_backend, x, weights, plan, on_input, save, emap is not None)


def _backward_op(dy, x, w1, w2, a1, a2, w, saved, on_input):
    weights = Weights(w1, w2, a1, a2)
    plan, act = experts_stage.unflatten_saved(saved, x.shape[0], w.shape[1], weights)
    return experts_stage.backward(cuda_backend, dy, x, weights, plan, act, on_input, LAM, w.dtype)


def _run(p, w, ids, grove, on_input, S, emap=None):
    args = [p[n] for n in ("x", "w1", "w2")] + ([p["a1"], p["a2"]] if grove else [None, None])
    y, saved = _forward_op(*args, w, ids, emap, S, on_input, save=True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    return y, dy, _backward_op(dy, *args, w, saved, on_input)


def _reference(p, w, ids, dy, grove, on_input, S):
    x, w1, w2, a1, a2, wt = (to64(t, True) for t in (p["x"], p["w1"], p["w2"], p["a1"],
                                                      p["a2"], w))
    if grove:
        y = oracle.grove_layer(x, w1, w2, a1, a2, wt, ids, S, LAM)
        leaves = [x, w1, w2, a1, a2, wt]
    else:
        y = oracle.fused_experts(x, w1, w2, wt, ids, apply_router_weight_on_input=on_input)
        leaves = [x, w1, w2, wt]
    gs = torch.autograd.grad(y, leaves, to64(dy))
    if not grove:
        gs = gs[:3] + (None, None) + gs[3:]
    return y, gs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["grove", "grove_coselected", "grove_sparse", "plain",
                                  "plain_on_input", "grove_S4"])
def test_dataflow_matches_oracle(stand_ins, gen, dtype, case):
    grove = case.startswith("grove")
    on_input = case == "plain_on_input"
    S = 4 if case == "grove_S4" else SHAPE["S"]
    kind = {"grove_coselected": "coselected", "grove_sparse": "sparse"}.get(case, "random")
    c = SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], S, gen, dtype)
    w, ids = routing(c["T"], c["E"], 1 if on_input else c["k"], gen, kind, S)
    y, dy, grads = _run(p, w, ids, grove, on_input, S)
    ref_y, ref_g = _reference(p, w, ids, dy, grove, on_input, S)
    assert rel_err(y, ref_y) <= 2e-2, "y"
    for name, got, ref in zip(GRADS, grads, ref_g):
        if ref is None:
            assert got.numel() == 0, name
            continue
        assert rel_err(got, ref) <= 2e-2, name


def test_empty_experts_get_zero_weight_gradients(stand_ins, gen):
    c = SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, torch.bfloat16)
    w, ids = routing(c["T"], c["E"], 2, gen, "sparse", c["S"])
    ids = ids.clamp(max=3)  # experts 4.. (and groups 2..) have no rows
    ids[:, 1] = (ids[:, 0] + 1) % 4
    _, _, (dx, dw1, dw2, da1, da2, dtw) = _run(p, w, ids, True, False, c["S"])
    assert (dw1[4:] == 0).all() and (dw2[4:] == 0).all()
    assert (da1[2:] == 0).all() and (da2[2:] == 0).all()
    assert torch.isfinite(dx).all() and torch.isfinite(dtw).all()


def test_refuses_what_the_kernels_cannot_run():
    from grove_kernels.backends import BACKENDS

    supports = BACKENDS["cuda"].supports
    x = torch.zeros(2, 32)
    w = (torch.zeros(4, 48, 32), torch.zeros(4, 32, 24), None, None)
    assert "sm_90" in supports(x, w)  # no GPU here
    x, w1, w2 = (t.bfloat16() for t in (x, torch.zeros(4, 44, 32), torch.zeros(4, 32, 22)))
    from grove_kernels.backends import unsupported

    assert "multiples of 8" in unsupported("cuda", x, (w1, w2, None, None), lib.DTYPES, 8)
    assert "supports" in unsupported("cuda", x.float(), (w1, w2, None, None), lib.DTYPES, 8)
    assert gk.available_backends()  # the registry still loads


def _forward(p, w, ids, grove=True, S=2):
    return _forward_op(p["x"], p["w1"], p["w2"], p["a1"] if grove else None,
                       p["a2"] if grove else None, w, ids, None, S, False)[0]


def _forward_reference(p, w, ids, grove=True, S=2):
    x, w1, w2, a1, a2, wt = (to64(t) for t in (p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w))
    if grove:
        return oracle.grove_layer(x, w1, w2, a1, a2, wt, ids, S, LAM)
    return oracle.fused_experts(x, w1, w2, wt, ids)


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(Settings, "fuse_swiglu", True)


def _gemm1_configs(p, w, ids, calls, grove=True):
    """The GEMM-1 kernel of each of `calls` forwards, each checked against the oracle."""
    configs = []
    for _ in range(calls):
        CALLS.clear()
        y = _forward(p, w, ids, grove)
        assert rel_err(y, _forward_reference(p, w, ids, grove)) <= 2e-2
        # GEMM-1 and GEMM-2, one launch each
        assert [_kind(k)[:2] for k in CALLS] == [("m", "nt")] * 2
        configs.append(CALLS[0])
    return configs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("grove", [True, False], ids=["grove", "plain"])
def test_fused_swiglu_when_enabled(stand_ins, gen, monkeypatch, grove, dtype):
    c = SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype)
    w, ids = routing(c["T"], c["E"], c["k"], gen, "coselected", c["S"])
    dt = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert Settings.fuse_swiglu == "auto" and settings_module.FUSE_SWIGLU_AUTO is False
    assert all(cfg.startswith(f"sm90_{dt}_m_grouped_nt_") and "swiglu" not in cfg
               for cfg in _gemm1_configs(p, w, ids, 2, grove))
    monkeypatch.setattr(Settings, "fuse_swiglu", True)
    assert all(cfg.startswith(f"sm90_{dt}_m_grouped_nt_swiglu_")
               for cfg in _gemm1_configs(p, w, ids, 2, grove))
    # "auto" as the one constant says; GROVE_CUDA_FUSE_SWIGLU=0 (False) overrides it.
    monkeypatch.setattr(Settings, "fuse_swiglu", "auto")
    monkeypatch.setattr(settings_module, "FUSE_SWIGLU_AUTO", True)
    assert all("swiglu" in cfg for cfg in _gemm1_configs(p, w, ids, 1, grove))
    monkeypatch.setattr(Settings, "fuse_swiglu", False)
    assert all("swiglu" not in cfg for cfg in _gemm1_configs(p, w, ids, 1, grove))


def test_fused_gemm1_reads_the_weights_in_place(stand_ins, fused, gen, monkeypatch):
    """No copy: the fused GEMM-1 gets w1 / a1 themselves, so an in-place update (versioned or
    not) is read by the next call, inference tensors included."""
    c = SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, torch.bfloat16)
    w, ids = routing(c["T"], c["E"], c["k"], gen, "random", c["S"])
    seen = []
    real = lib.grouped_gemm
    monkeypatch.setattr(lib, "grouped_gemm", lambda a, b, *rest, **kw: (
        seen.append([t.data_ptr() for t in b]), real(a, b, *rest, **kw))[1])
    _gemm1_configs(p, w, ids, 1)
    assert seen[0] == [p["w1"].data_ptr(), p["a1"].data_ptr()]
    with torch.no_grad():
        p["w1"].data.mul_(-1.5)  # not versioned by torch: read all the same
        p["a1"][:, : c["Ia"]] += 1  # gate rows only
    assert all("swiglu" in cfg for cfg in _gemm1_configs(p, w, ids, 2))  # each checked
    with torch.inference_mode():
        q = {n: t.clone() for n, t in p.items()}
    assert all("swiglu" in cfg for cfg in _gemm1_configs(q, w, ids, 1))


def test_float64_router_weights(stand_ins, gen):
    c = SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, torch.bfloat16)
    w, ids = routing(c["T"], c["E"], c["k"], gen, "random", c["S"])
    y, dy, grads = _run(p, w.double(), ids, True, False, c["S"])  # kernels get fp32 weights
    ref_y, ref_g = _reference(p, w.double(), ids, dy, True, False, c["S"])
    assert rel_err(y, ref_y) <= 2e-2
    assert grads[-1].dtype == torch.float64 and rel_err(grads[-1], ref_g[-1]) <= 2e-2


def test_training_never_uses_the_fused_gemm(stand_ins, fused, gen):
    c = SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, torch.bfloat16)
    w, ids = routing(c["T"], c["E"], c["k"], gen, "random", c["S"])
    _forward(p, w, ids)
    _forward(p, w, ids)
    CALLS.clear()
    _run(p, w, ids, True, False, c["S"])
    assert CALLS and not any("swiglu" in k for k in CALLS)  # the backward needs h = [gate | up]


@pytest.mark.parametrize("case", ["grove", "plain", "plain_on_input", "expert_map"])
def test_backward_from_saved_activations(stand_ins, gen, case):
    grove, on_input = case == "grove", case == "plain_on_input"
    c = SHAPE
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, torch.bfloat16)
    w, ids = routing(c["T"], c["E"], 1 if on_input else c["k"], gen,
                     "random" if on_input else "coselected", c["S"])
    emap = None
    if case == "expert_map":  # global experts 0..7 -> local 0..5, two skipped
        emap = torch.tensor([0, -1, 1, 2, -1, 3, 4, 5], dtype=torch.int32)
        p = dict(p, w1=p["w1"][:6].contiguous(), w2=p["w2"][:6].contiguous())
    args = [p["x"], p["w1"], p["w2"]] + ([p["a1"], p["a2"]] if grove else [None, None])
    CALLS.clear()
    y, saved = _forward_op(*args, w, ids, emap, c["S"], on_input, save=True)
    assert not any("swiglu" in k for k in CALLS)  # the backward needs h: unfused
    # Every element written (rows of no problem zeroed), though the allocator held NaN.
    assert not any(t.isnan().any() for t in saved if t.is_floating_point())
    kept = [t.clone() for t in saved]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    CALLS.clear()
    grads = _backward_op(dy, *args, w, saved, on_input)
    # GEMM-1 is not recomputed: only dGEMM-2, the weight gradients and dGEMM-1 run.
    assert [_kind(k)[:2] for k in CALLS] == [("m", "nn"), ("k", "tn"), ("k", "tn"),
                                             ("m", "nn")]
    assert all(torch.equal(a, b) for a, b in zip(saved, kept))  # saved is read only
    if emap is None:
        ref_y, ref_g = _reference(p, w, ids, dy, grove, on_input, c["S"])
    else:
        leaves = [to64(t, True) for t in (p["x"], p["w1"], p["w2"], w)]
        ref_y = oracle.fused_experts(*leaves[:3], leaves[3], ids, expert_map=emap)
        ref_g = torch.autograd.grad(ref_y, leaves, to64(dy))
        ref_g = ref_g[:3] + (None, None) + ref_g[3:]
    assert rel_err(y, ref_y) <= 2e-2
    for name, got, ref in zip(GRADS, grads, ref_g):
        if ref is None:
            assert got.numel() == 0, name
            continue
        assert rel_err(got, ref) <= 2e-2, name
