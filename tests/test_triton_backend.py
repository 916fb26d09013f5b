"""The triton backend really runs its kernels: launch counts per op (no quiet fallback to torch),
the configuration table, and the weights-layout check."""
import pytest
import torch

import grove_kernels as gk
from grove_kernels import backends

pytestmark = pytest.mark.skipif("triton" not in gk.available_backends(),
                                reason="triton backend unavailable")

if "triton" in gk.available_backends():
    from grove_kernels.triton import config as cfg


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched, in order; the sections layout unless a test
    asks for another (triton's default is folded)."""
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "sections")
    from grove_kernels.triton.combine import _combine_rows_kernel

    # JITFunction when compiled, InterpretedFunction under TRITON_INTERPRET=1.
    kind = type(_combine_rows_kernel)
    seen = []
    original = kind.run

    def run(self, *args, **kwargs):
        seen.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kind, "run", run)
    return seen


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _layer(T=11, H=32, E=8, k=3, I=16, S=2, Ia=8, adjugates=True):
    g = torch.Generator().manual_seed(T)
    mk = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(_device())  # noqa: E731
    x, w1, w2 = mk(T, H), mk(E, 2 * I, H), mk(E, H, I)
    a1, a2 = (mk(E // S, 2 * Ia, H), mk(E // S, H, Ia)) if adjugates else (None, None)
    logits = torch.randn(T, E, generator=g).to(_device())
    return x, w1, w2, a1, a2, logits


PLAN = ["_plan_slots_kernel", "_plan_scan_kernel", "_plan_offsets_kernel", "_plan_scatter_kernel"]


def test_forward_launches(launches):
    x, w1, w2, a1, a2, logits = _layer()
    with gk.use_backend("triton"):
        gk.grove_moe(x, logits, w1, w2, a1, a2, top_k=3)
    assert launches == ["_topk_softmax_kernel"] + PLAN + [
        "_gemm1_swiglu_kernel", "_gemm_m_grouped_kernel", "_combine_rows_kernel"]


def test_backward_launches(launches):
    x, w1, w2, a1, a2, logits = _layer()
    leaves = [t.requires_grad_() for t in (x, w1, w2, a1, a2, logits)]
    with gk.use_backend("triton"):
        y = gk.grove_moe(leaves[0], leaves[5], *leaves[1:5], top_k=3)
        del launches[:]
        y.backward(torch.randn_like(y))
    # Neither the plan nor GEMM-1 is rebuilt: the training forward handed both over.
    assert launches == [
        "_gemm_m_grouped_kernel",  # dY @ W2 with the SwiGLU-backward epilogue
        "_gemm_k_grouped_kernel", "_gemm_k_grouped_kernel",  # dW2/dA2, dW1/dA1
        "_gemm_m_grouped_kernel", "_combine_rows_kernel",  # dX rows, dX
    ]
    assert all(t.grad is not None for t in leaves)


def test_plain_moe_uses_the_same_kernels(launches):
    x, w1, w2, _, _, logits = _layer(adjugates=False)
    w, ids = gk.grove_topk(logits, 2)
    del launches[:]
    with gk.use_backend("triton"):
        gk.fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input=True)
    assert launches == PLAN + ["_gemm1_swiglu_kernel", "_gemm_m_grouped_kernel",
                               "_combine_rows_kernel"]


def test_resolved_backend_is_triton_when_selected():
    x, w1, w2, a1, a2, _ = _layer()
    with gk.use_backend("triton"):
        assert backends.resolve(x, (w1, w2, a1, a2)) == "triton"
        assert backends.resolve(x) == "triton"


def test_config_buckets_follow_rows_per_problem():
    class P:
        num_experts, top_k = 128, 8

    small, large = P(), P()
    small.num_tokens, large.num_tokens = 16, 16384
    a = cfg.select(small, 2048, 768, 128, torch.bfloat16)
    b = cfg.select(large, 2048, 768, 128, torch.bfloat16)
    if not cfg.INTERPRET:
        assert a.block_m < b.block_m
    # fp32 operands never get more shared memory per stage than bf16 ones.
    f = cfg.select(large, 2048, 768, 128, torch.float32)
    assert f.gemm1.bk <= b.gemm1.bk and f.rows.bk <= b.rows.bk


def test_non_contiguous_weights_are_refused_by_name():
    x, w1, w2, a1, a2, logits = _layer()
    w, ids = gk.grove_topk(logits, 3)
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    with gk.use_backend("triton"), pytest.raises(ValueError, match="w1"):
        gk.fused_grove_experts(x, w1_t, w2, a1, a2, w, ids)


FOLDED_PLAN = ["_folded_slots_kernel", "_plan_scan_kernel", "_folded_offsets_kernel",
               "_folded_scatter_kernel"]


def test_folded_launches(launches, monkeypatch):
    """GROVE_ADJUGATE_LAYOUT=folded runs the folded plan and kernels, forward and backward;
    unset, triton runs its default_layout (folded too); =sections runs the sections kernels."""
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")
    x, w1, w2, a1, a2, logits = _layer()
    leaves = [t.requires_grad_() for t in (x, w1, w2, a1, a2, logits)]
    with gk.use_backend("triton"):
        y = gk.grove_moe(leaves[0], leaves[5], *leaves[1:5], top_k=3)
        assert launches == ["_topk_softmax_kernel"] + FOLDED_PLAN + [
            "_folded_gemm1_kernel", "_folded_k_concat_kernel", "_combine_rows_kernel"]
        del launches[:]
        y.backward(torch.randn_like(y))
    assert launches == ["_folded_dgemm2_kernel", "_folded_wgrad_kernel", "_folded_wgrad_kernel",
                        "_folded_k_concat_kernel", "_combine_rows_kernel"]
    args = [t.detach() for t in (x, logits, w1, w2, a1, a2)]
    monkeypatch.delenv("GROVE_ADJUGATE_LAYOUT")
    del launches[:]
    with gk.use_backend("triton"):
        gk.grove_moe(*args, top_k=3)
    assert launches[5] == "_folded_gemm1_kernel"
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "sections")
    del launches[:]
    with gk.use_backend("triton"):
        gk.grove_moe(*args, top_k=3)
    assert launches[5] == "_gemm1_swiglu_kernel"
