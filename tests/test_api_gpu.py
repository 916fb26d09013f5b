"""The public API on a CUDA GPU, every backend (skipped without CUDA; docs/design.md §2, §3, §5).

    scaled grove-33b   T=97, H=256, E=32, k=8, I=96, Ia=32, S=2: forward and every gradient
                       against the fp64 CPU oracle, fp32 (IEEE: 1e-4; with tf32 allowed by
                       torch.backends.cuda.matmul.allow_tf32: 1e-3), bf16, fp16
    full grove-33b     T=64, H=2048, E=128, k=8, I=768, Ia=128, bf16: forward
    no host sync       forward under torch.cuda.set_sync_debug_mode("error"), value checks off
    CUDA graph         capture fused_grove_experts (bf16) once, rewrite topk_ids/topk_weights
                       in place, replay: equals eager on the new routing
    cuda, opt-in       settings.fuse_swiglu: GEMM-1 with SwiGLU fused (w1/a1 read in place) against
                       the oracle, after an in-place update, graph replay; a
                       one-row input with strides (1, 1)
The Grove tests run both adjugate layouts (the `layout` fixture sets GROVE_ADJUGATE_LAYOUT to
sections, then folded), each backend on each.

Before each checked call the caching allocator is filled with NaN, so an output element a
kernel forgets to write shows up as NaN (which never passes).
"""
import pytest
import torch

import grove_kernels as gk
import grove_kernels.cuda as cuda_backend
from grove_kernels.cuda import ext as cuda_ext
from grove_kernels.settings import Settings
import oracle
from helpers import (
    BACKENDS,
    DTYPE_IDS,
    FLOATS,
    assert_close,
    leaf,
    make_grove,
    randn,
    rel_err,
    router_logits,
    routing,
    to64,
)

pytestmark = pytest.mark.gpu

DEV = "cuda"
LAM = 0.5
SMALL = dict(T=97, H=256, E=32, I=96, Ia=32, k=8, S=2)
ALL_DTYPES = pytest.mark.parametrize("dtype", FLOATS, ids=DTYPE_IDS.get)
GRAD_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                                      ids=DTYPE_IDS.get)


@pytest.fixture(params=BACKENDS)
def backend(request):
    dtype = getattr(getattr(request.node, "callspec", None), "params", {}).get("dtype")
    if request.param == "cuda" and dtype is not None and dtype not in cuda_backend.DTYPES:
        pytest.skip(f"the cuda backend runs bf16 and fp16, not {dtype}")
    with gk.use_backend(request.param):
        yield request.param


def poison():
    """Fill 512 MiB of the caching allocator's free blocks with NaN."""
    blocks = [torch.full((16 << 20,), float("nan"), device=DEV) for _ in range(8)]
    del blocks


def on_torch(backend, fn):
    """fn() under the torch backend when `backend` is another one (for the 2x rule)."""
    if backend == "torch":
        return None
    with gk.use_backend("torch"):
        return fn()


def _grove(gen, dtype, kind="random", c=SMALL):
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype, DEV)
    w, ids = routing(c["T"], c["E"], c["k"], gen, kind, c["S"], device=DEV)
    return p, w, ids.to(torch.int32)


def _grove_oracle(p, w, ids, S=SMALL["S"], lam=LAM):
    return oracle.grove_layer(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(p["a1"]),
                              to64(p["a2"]), to64(w), ids.cpu(), S, lam)


# ----------------------------------------------------------------------------- forward


@ALL_DTYPES
@pytest.mark.parametrize("kind", ["random", "coselected", "sparse", "one_expert"])
def test_fused_grove_experts_gpu(backend, layout, gen, kind, dtype):
    p, w, ids = _grove(gen, dtype, kind)

    def call():
        poison()
        return gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                                      group_size=SMALL["S"], adjugate_scale=LAM)

    y = call()
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == p["x"].shape
    assert_close(y, _grove_oracle(p, w, ids), "y", torch_out=on_torch(backend, call))


@ALL_DTYPES
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_grove_moe_gpu(backend, layout, gen, bias, dtype):
    c = SMALL
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype, DEV)
    logits = router_logits(c["T"], c["E"], gen, torch.float32, DEV)
    b = (torch.randn(c["E"], generator=gen) * 0.3).to(DEV) if bias else None

    def call():
        poison()
        return gk.grove_moe(p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=c["k"],
                            group_size=c["S"], adjugate_scale=LAM, selection_bias=b)

    y = call()
    ref = oracle.grove_moe(to64(p["x"]), to64(logits), to64(p["w1"]), to64(p["w2"]),
                           to64(p["a1"]), to64(p["a2"]), c["k"], c["S"], LAM, True, to64(b))
    assert_close(y, ref, "y", torch_out=on_torch(backend, call))


@ALL_DTYPES
@pytest.mark.parametrize("variant", ["plain", "expert_map", "weight_on_input"])
def test_fused_experts_gpu(backend, gen, variant, dtype):
    c = SMALL
    k = 1 if variant == "weight_on_input" else c["k"]
    E_local = c["E"] // 2 if variant == "expert_map" else c["E"]
    p = make_grove(c["T"], c["H"], E_local, c["I"], c["Ia"], c["S"], gen, dtype, DEV)
    w, ids = routing(c["T"], c["E"], k, gen, device=DEV)
    kw, emap = {}, None
    if variant == "expert_map":  # odd global experts live on this rank
        emap = torch.full((c["E"],), -1, dtype=torch.int32)
        emap[1::2] = torch.arange(E_local, dtype=torch.int32)
        kw = dict(global_num_experts=c["E"], expert_map=emap.to(DEV))
    on_input = variant == "weight_on_input"

    def call():
        poison()
        return gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids,
                                apply_router_weight_on_input=on_input, **kw)

    y = call()
    ref = oracle.fused_experts(to64(p["x"]), to64(p["w1"]), to64(p["w2"]), to64(w), ids.cpu(),
                               apply_router_weight_on_input=on_input, expert_map=emap)
    assert_close(y, ref, "y", torch_out=on_torch(backend, call))


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_batches_gpu(backend, gen, T):
    c = dict(SMALL, T=T)
    p, w, ids = _grove(gen, torch.bfloat16, c=c)
    poison()
    y = gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                               group_size=c["S"], adjugate_scale=LAM)
    assert y.shape == (T, c["H"]) and y.dtype == torch.bfloat16
    assert_close(y, _grove_oracle(p, w, ids), "y")


def test_full_grove33b_bf16(backend, layout):
    c = dict(T=64, H=2048, E=128, I=768, Ia=128, k=8, S=2)
    g = torch.Generator(device=DEV).manual_seed(33)

    def r(*shape, scale=1.0):  # generated on the GPU: 0.6 G values would be slow on the CPU
        return (torch.randn(*shape, generator=g, device=DEV) * scale).bfloat16()

    H, I, Ia, E, G = c["H"], c["I"], c["Ia"], c["E"], c["E"] // c["S"]
    p = dict(x=r(c["T"], H), w1=r(E, 2 * I, H, scale=H ** -0.5), w2=r(E, H, I, scale=I ** -0.5),
             a1=r(G, 2 * Ia, H, scale=H ** -0.5), a2=r(G, H, Ia, scale=Ia ** -0.5))
    w, ids = routing(c["T"], E, c["k"], torch.Generator().manual_seed(34), device=DEV)
    ids = ids.to(torch.int32)

    def call():
        poison()
        return gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids)

    y = call()
    ref = _grove_oracle(p, w, ids, 2, 0.05)
    assert_close(y, ref, "y", torch_out=on_torch(backend, call))


# ----------------------------------------------------------------------------- gradients


def _backward(fn, inputs, dy):
    leaves = {n: leaf(t) for n, t in inputs.items()}
    poison()
    y = fn(**leaves)
    y.backward(dy)
    return y, {n: t.grad for n, t in leaves.items()}


def _check_grads(backend, fn, inputs, dy, ref, y_ref, dtype):
    y, grads = _backward(fn, inputs, dy)
    y_ref.backward(to64(dy))
    torch_run = on_torch(backend, lambda: _backward(fn, inputs, dy))
    assert_close(y, y_ref, "y", dtype=dtype)
    for n, g in grads.items():
        assert g is not None and g.dtype == inputs[n].dtype, n
        assert_close(g, ref[n].grad, f"d{n}", dtype=dtype,
                     torch_out=torch_run[1][n] if torch_run else None)


@GRAD_DTYPES
@pytest.mark.parametrize("kind", ["random", "coselected"])
def test_fused_grove_experts_grad_gpu(backend, layout, gen, kind, dtype):
    p, w, ids = _grove(gen, dtype, kind)
    inputs = dict(p, topk_weights=w)
    dy = randn(*p["x"].shape, gen=gen, dtype=dtype, device=DEV)

    def fn(x, w1, w2, a1, a2, topk_weights):
        return gk.fused_grove_experts(x, w1, w2, a1, a2, topk_weights, ids,
                                      group_size=SMALL["S"], adjugate_scale=LAM)

    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.grove_layer(ref["x"], ref["w1"], ref["w2"], ref["a1"], ref["a2"],
                               ref["topk_weights"], ids.cpu(), SMALL["S"], LAM)
    _check_grads(backend, fn, inputs, dy, ref, y_ref, dtype)


@GRAD_DTYPES
def test_grove_moe_grad_gpu(backend, layout, gen, dtype):
    c = SMALL
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype, DEV)
    inputs = dict(p, router_logits=router_logits(c["T"], c["E"], gen, torch.float32, DEV))
    bias = (torch.randn(c["E"], generator=gen) * 0.3).to(DEV)
    dy = randn(c["T"], c["H"], gen=gen, dtype=dtype, device=DEV)

    def fn(x, router_logits, w1, w2, a1, a2):
        return gk.grove_moe(x, router_logits, w1, w2, a1, a2, top_k=c["k"], group_size=c["S"],
                            adjugate_scale=LAM, selection_bias=bias)

    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.grove_moe(ref["x"], ref["router_logits"], ref["w1"], ref["w2"], ref["a1"],
                             ref["a2"], c["k"], c["S"], LAM, True, to64(bias))
    _check_grads(backend, fn, inputs, dy, ref, y_ref, dtype)


@GRAD_DTYPES
@pytest.mark.parametrize("on_input", [False, True], ids=["weight_out", "weight_in"])
def test_fused_experts_grad_gpu(backend, gen, on_input, dtype):
    c = SMALL
    k = 1 if on_input else c["k"]
    p = make_grove(c["T"], c["H"], c["E"], c["I"], c["Ia"], c["S"], gen, dtype, DEV)
    w, ids = routing(c["T"], c["E"], k, gen, device=DEV)
    inputs = dict(x=p["x"], w1=p["w1"], w2=p["w2"], topk_weights=w)
    dy = randn(c["T"], c["H"], gen=gen, dtype=dtype, device=DEV)

    def fn(x, w1, w2, topk_weights):
        return gk.fused_experts(x, w1, w2, topk_weights, ids,
                                apply_router_weight_on_input=on_input)

    ref = {n: to64(t, requires_grad=True) for n, t in inputs.items()}
    y_ref = oracle.fused_experts(ref["x"], ref["w1"], ref["w2"], ref["topk_weights"],
                                 ids.cpu(), apply_router_weight_on_input=on_input)
    _check_grads(backend, fn, inputs, dy, ref, y_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_gpu(backend, layout, gen, dtype):
    p, w, ids = _grove(gen, dtype, "random")
    inputs = dict(p, topk_weights=w)
    dy = randn(*p["x"].shape, gen=gen, dtype=dtype, device=DEV)

    def fn(x, w1, w2, a1, a2, topk_weights):
        return gk.fused_grove_experts(x, w1, w2, a1, a2, topk_weights, ids,
                                      group_size=SMALL["S"], adjugate_scale=LAM)

    y1, g1 = _backward(fn, inputs, dy)
    y2, g2 = _backward(fn, inputs, dy)
    assert torch.equal(y1, y2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


# ----------------------------------------------------------------------------- serving


def test_no_host_sync(backend, layout, gen):
    """With value checks off, a bf16 forward never synchronizes with the host."""
    c = SMALL
    p, w, ids = _grove(gen, torch.bfloat16)
    logits = router_logits(c["T"], c["E"], gen, torch.float32, DEV)
    emap = torch.arange(c["E"], dtype=torch.int32, device=DEV)

    def calls():
        return [
            gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids),
            gk.grove_moe(p["x"], logits, p["w1"], p["w2"], p["a1"], p["a2"], top_k=c["k"]),
            gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids),
            gk.fused_experts(p["x"], p["w1"], p["w2"], w, ids, global_num_experts=c["E"],
                             expert_map=emap),
            gk.fused_moe(p["x"], p["w1"], p["w2"], logits, c["k"], True),
        ]

    gk.set_value_checks(False)
    try:
        calls()  # warm-up: lazy initialisation may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = calls()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        gk.set_value_checks(True)
    for y in outs:
        assert torch.isfinite(y).all()


class _Captured:
    """fused_grove_experts (bf16, T=64) warmed up on a side stream and captured in a graph
    whose topk_weights / topk_ids are rewritten before each replay."""

    def __init__(self, gen, warmups):
        self.c = c = dict(SMALL, T=64)
        self.p, w, ids = _grove(gen, torch.bfloat16, c=c)
        self.w, self.ids = w.clone(), ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmups):
                self.call()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = self.call()

    def call(self):
        p = self.p
        return gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], self.w,
                                      self.ids, group_size=self.c["S"], adjugate_scale=LAM)

    def replay(self, gen, kind):
        c = self.c
        new_w, new_ids = routing(c["T"], c["E"], c["k"], gen, kind, c["S"], device=DEV)
        self.w.copy_(new_w)
        self.ids.copy_(new_ids)
        self.graph.replay()
        torch.cuda.synchronize()
        return self.y


def test_cuda_graph_replay(backend, layout, gen):
    """Capture once (value checks on: skipped automatically while capturing), then replay
    with new routing written into the captured topk_ids / topk_weights."""
    cap = _Captured(gen, warmups=2)
    for kind in ("random", "coselected", "one_expert", "sparse"):
        y = cap.replay(gen, kind)
        assert rel_err(y, cap.call()) <= 1e-6, kind
        assert_close(y, _grove_oracle(cap.p, cap.w, cap.ids, cap.c["S"]), f"y ({kind})")


@pytest.mark.parametrize("arg", ["w1", "a2", "topk_ids", "topk_weights"])
def test_device_mismatch(backend, gen, arg):
    p, w, ids = _grove(gen, torch.float32, c=dict(SMALL, T=5))
    a = dict(p, topk_weights=w, topk_ids=ids)
    a[arg] = a[arg].cpu()
    with pytest.raises(ValueError, match=arg):
        gk.fused_grove_experts(a["x"], a["w1"], a["w2"], a["a1"], a["a2"], a["topk_weights"],
                               a["topk_ids"])


# ------------------------------------------------------------- cuda: opt-in fused SwiGLU


@pytest.fixture
def cuda_fused(monkeypatch):
    if not cuda_backend.is_available():
        pytest.skip("needs grove_kernels._C and an sm_90 GPU")
    monkeypatch.setattr(Settings, "fuse_swiglu", True)
    cuda_backend.release_packed_weights()
    configs = []
    real = cuda_ext.grouped_gemm

    def spy(a, b, out, start, count, config, *rest, **kw):
        configs.append(config)
        return real(a, b, out, start, count, config, *rest, **kw)

    monkeypatch.setattr(cuda_ext, "grouped_gemm", spy)
    with gk.use_backend("cuda"):
        yield configs
    cuda_backend.release_packed_weights()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("c", [SMALL, dict(SMALL, T=1), dict(SMALL, I=24, Ia=8, T=33)],
                         ids=["small", "T1", "narrow"])
def test_cuda_fused_swiglu_forward(cuda_fused, layout, gen, dtype, c):
    p, w, ids = _grove(gen, dtype, c=c)
    for attempt in range(2):
        poison()
        cuda_fused.clear()
        y = gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                                   group_size=c["S"], adjugate_scale=LAM)
        assert "_m_grouped_nt_swiglu_" in cuda_fused[0], cuda_fused
        assert_close(y, _grove_oracle(p, w, ids, c["S"]), f"y (call {attempt})")
    with torch.no_grad():
        p["w1"].mul_(-1)  # read in place: the next call sees it
    y = gk.fused_grove_experts(p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                               group_size=c["S"], adjugate_scale=LAM)
    assert_close(y, _grove_oracle(p, w, ids, c["S"]), "y after w1 changed")


def test_cuda_fused_swiglu_graph_replay(cuda_fused, layout, gen):
    cap = _Captured(gen, warmups=1)
    assert all("_m_grouped_nt_swiglu_" in cfg for cfg in cuda_fused[::2])  # each call's GEMM-1
    with torch.no_grad():
        cap.p["w1"].mul_(-1)  # the graph reads w1 in place: replays see the new values
    cap.call()
    for kind in ("random", "one_expert"):
        y = cap.replay(gen, kind)
        assert_close(y, _grove_oracle(cap.p, cap.w, cap.ids, cap.c["S"]), f"y ({kind})")


def test_cuda_one_row_with_odd_strides(gen):
    if not cuda_backend.is_available():
        pytest.skip("needs grove_kernels._C and an sm_90 GPU")
    c = dict(SMALL, T=1)
    p, w, ids = _grove(gen, torch.bfloat16, c=c)
    x = p["x"].reshape(-1, 1).t()  # [1, H] with strides (1, 1): "contiguous" to torch
    assert x.stride() == (1, 1)
    with gk.use_backend("cuda"):
        y = gk.fused_grove_experts(x, p["w1"], p["w2"], p["a1"], p["a2"], w, ids,
                                   group_size=c["S"], adjugate_scale=LAM)
    assert_close(y, _grove_oracle(p, w, ids, c["S"]), "y")


def test_cuda_training_backward_reads_saved_preactivations(layout, gen, monkeypatch):
    if not cuda_backend.is_available():
        pytest.skip("needs grove_kernels._C and an sm_90 GPU")
    configs = []
    real = cuda_ext.grouped_gemm
    monkeypatch.setattr(cuda_ext, "grouped_gemm",
                        lambda *a, **kw: configs.append(a[5]) or real(*a, **kw))
    p, w, ids = _grove(gen, torch.bfloat16)
    x, w1, w2, a1, a2, wt = (leaf(t) for t in (p["x"], p["w1"], p["w2"], p["a1"], p["a2"], w))
    with gk.use_backend("cuda"):
        y = gk.fused_grove_experts(x, w1, w2, a1, a2, wt, ids, group_size=SMALL["S"],
                                   adjugate_scale=LAM)
        forward = len(configs)
        y.backward(torch.randn_like(y))
    assert sum("_m_grouped_nt_" in c for c in configs[:forward]) == 2  # GEMM-1 (h kept) and GEMM-2
    assert not any("_m_grouped_nt_" in c for c in configs[forward:]), configs[forward:]
    ref = _grove_oracle(p, w, ids)
    assert_close(y, ref, "y")
