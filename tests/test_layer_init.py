"""GroveMoE built on the meta device (deferred init, FSDP) and materialised, and the argument
check of update_selection_bias.

    GroveMoE(..., device="meta") -> to_empty(device) -> reset_parameters() -> a usable layer,
    equal to one built on the device and reset from the same seed (usable on CUDA too:
    `gpu`); expert_bias stays fp32 through every conversion (a bf16 one would lose the 1e-3
    updates).
"""
import pytest
import torch

import grove_kernels as gk
from grove_kernels import _validate

H, I, E, K, S, IA = 24, 10, 8, 3, 2, 6


def _meta(dtype=None):
    return gk.GroveMoE(H, I, E, K, S, IA, 0.05, device="meta", dtype=dtype)


def test_reproducer_meta_to_empty():
    layer = gk.GroveMoE(16, 8, 8, 2, device="meta").to_empty(device="cpu")
    layer.reset_parameters()
    y = layer(torch.randn(5, 16))
    assert y.shape == (5, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_then_reset_equals_a_layer_built_in_place(dtype):
    layer = _meta(dtype).to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in list(layer.parameters()) + list(layer.buffers()))
    assert layer.expert_bias.dtype == torch.float32
    ref = gk.GroveMoE(H, I, E, K, S, IA, 0.05, dtype=dtype)
    torch.manual_seed(3)
    layer.reset_parameters()
    torch.manual_seed(3)
    ref.reset_parameters()
    for (name, got), (_, want) in zip(layer.state_dict().items(), ref.state_dict().items()):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    x = torch.randn(7, H, dtype=dtype or torch.float32)
    layer.train()(x).float().square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    torch.testing.assert_close(layer.eval()(x), ref.eval()(x), rtol=0, atol=0)


def test_meta_conversions_keep_the_bias_fp32():
    layer = _meta().to(torch.bfloat16)
    assert layer.w1.dtype == torch.bfloat16 and layer.expert_bias.dtype == torch.float32
    assert layer.expert_bias.is_meta
    layer = layer.to_empty(device="cpu")
    assert layer.expert_bias.dtype == torch.float32 and not layer.expert_bias.is_meta
    layer.reset_parameters()
    layer.expert_bias.fill_(1e-3 / 3)  # not a bf16 number
    layer.half()
    assert layer.expert_bias.dtype == torch.float32 and layer.expert_bias[0] == 1e-3 / 3


@pytest.mark.parametrize("bad", [E, E + 5, -1], ids=["E", "E+5", "-1"])
def test_update_selection_bias_out_of_range_names_topk_ids(bad):
    layer = gk.GroveMoE(H, I, E, K, S, IA, 0.05)
    ids = torch.tensor([[0, 1, 2], [3, bad, 4]])
    with pytest.raises(IndexError, match="topk_ids"):
        layer.update_selection_bias(ids)
    assert torch.equal(layer.expert_bias, torch.zeros(E))


@pytest.mark.gpu
def test_meta_to_cuda():
    layer = _meta(torch.bfloat16).to_empty(device="cuda")
    layer.reset_parameters()
    assert layer.w1.is_cuda and layer.expert_bias.is_cuda
    assert layer.expert_bias.dtype == torch.float32
    y = layer(torch.randn(9, H, device="cuda", dtype=torch.bfloat16))
    assert y.shape == (9, H) and torch.isfinite(y).all()
    with pytest.raises(IndexError, match="topk_ids"):
        layer.update_selection_bias(torch.tensor([[0, E]], device="cuda"))


def test_update_selection_bias_without_value_checks_leaves_bad_ids_out():
    layer, ref = gk.GroveMoE(H, I, E, K, S, IA, 0.05), gk.GroveMoE(H, I, E, K, S, IA, 0.05)
    with _validate.value_checks(False):
        layer.update_selection_bias(torch.tensor([[0, 1, 2], [3, E, 4], [-1, 5, 0]]), lr=0.1)
    ref.update_selection_bias(torch.tensor([0, 1, 2, 3, 4, 5, 0]), lr=0.1)
    assert torch.equal(layer.expert_bias, ref.expert_bias) and ref.expert_bias.any()
