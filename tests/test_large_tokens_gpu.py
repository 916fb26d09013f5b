"""GPU: a call whose row buffers hold more than 2^31 elements (R · H > 2^31 with T = 65,600,
k = 8, H = 4096: R = 524,800 rows), where any 32-bit row x stride offset would wrap. The
tokens at both ends (their rows lie at the first and the last offsets) are compared with an
fp32 computation of the same experts; dx rows too (the backward's dx rows buffer is as large).

tests/test_triton_codegen.py checks the same property on the CPU from the compiled IR.
"""
import pytest
import torch
import torch.nn.functional as F

import grove_kernels as gk

pytestmark = pytest.mark.gpu

T, H, E, I, K = 65_600, 4096, 8, 64, 8


def _expert_rows(x, w1, w2, w, ids):
    """fp32 y rows of the given tokens: Σ_j w_j · w2[e] (silu(w1[e, :I] x) · w1[e, I:] x)."""
    x = x.float()
    y = torch.zeros_like(x)
    for j in range(ids.shape[1]):
        e = ids[:, j].long()
        h = torch.einsum("th,tnh->tn", x, w1[e].float())
        z = F.silu(h[:, :I]) * h[:, I:]
        y = y + w[:, j, None] * torch.einsum("ti,thi->th", z, w2[e].float())
    return y


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_rows_past_2_to_the_31_elements(backend):
    if backend not in gk.available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    assert T * K * H > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(T, H, device=dev, generator=gen).to(bf16).requires_grad_()
    w1 = (torch.randn(E, 2 * I, H, device=dev, generator=gen) * H ** -0.5).to(bf16)
    w2 = (torch.randn(E, H, I, device=dev, generator=gen) * I ** -0.5).to(bf16)
    ids = torch.rand(T, E, device=dev, generator=gen).argsort(1)[:, :K].to(torch.int32)
    w = torch.rand(T, K, device=dev, generator=gen) + 0.1
    dy = torch.randn(T, H, device=dev, generator=gen).to(bf16)
    with gk.use_backend(backend):
        y = gk.fused_experts(x, w1, w2, w, ids)
        y.backward(dy)
    ends = torch.cat([torch.arange(4), torch.arange(T - 4, T)]).to(dev)
    xs = x.detach()[ends].float().requires_grad_()
    ref = _expert_rows(xs, w1, w2, w[ends], ids[ends])
    ref.backward(dy[ends].float())
    for name, got, want in (("y", y.detach()[ends], ref), ("dx", x.grad[ends], xs.grad)):
        got = got.float()
        assert torch.isfinite(got).all(), name
        err = ((got - want).norm() / want.norm()).item()
        assert err <= 2e-2, f"{name}: rel err {err:.3e}"
