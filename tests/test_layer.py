"""GroveMoE (grove_kernels/layer.py): packing, forward against the functional API, the
selection-bias update, gradients reaching every parameter, and bad constructor arguments."""
import pytest
import torch

import grove_kernels as gk

H, I, E, K, S, IA = 24, 10, 8, 3, 2, 6


def _layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return gk.GroveMoE(H, I, E, K, S, IA, 0.05, dtype=dtype)


def test_forward_matches_functional_api_on_any_leading_shape():
    layer = _layer()
    x = torch.randn(2, 5, H)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    flat = x.reshape(-1, H)
    logits = flat @ layer.gate.weight.t()
    ref = gk.grove_moe(flat, logits, layer.w1, layer.w2, layer.a1, layer.a2, top_k=K,
                       group_size=S, adjugate_scale=0.05, selection_bias=layer.expert_bias)
    torch.testing.assert_close(y.reshape(-1, H), ref, rtol=0, atol=0)


def test_load_expert_weights_packs_gate_up_down():
    layer = _layer()
    g = torch.Generator().manual_seed(1)
    gate, up, down = (torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g),
                      torch.randn(E, H, I, generator=g))
    agate, aup, adown = (torch.randn(E // S, IA, H, generator=g),
                         torch.randn(E // S, IA, H, generator=g),
                         torch.randn(E // S, H, IA, generator=g))
    layer.load_expert_weights(list(gate), list(up), down, agate, list(aup), list(adown))
    assert torch.equal(layer.w1[:, :I], gate) and torch.equal(layer.w1[:, I:], up)
    assert torch.equal(layer.w2, down)
    assert torch.equal(layer.a1[:, :IA], agate) and torch.equal(layer.a1[:, IA:], aup)
    assert torch.equal(layer.a2, adown)


def test_load_expert_weights_rejects_wrong_shapes():
    layer = _layer()
    good = dict(gate_proj=torch.zeros(E, I, H), up_proj=torch.zeros(E, I, H),
                down_proj=torch.zeros(E, H, I), adj_gate_proj=torch.zeros(E // S, IA, H),
                adj_up_proj=torch.zeros(E // S, IA, H), adj_down_proj=torch.zeros(E // S, H, IA))
    for name in good:
        bad = dict(good)
        bad[name] = torch.zeros(3, 2, 1)
        with pytest.raises(ValueError, match=name):
            layer.load_expert_weights(**bad)
    bad = dict(good, down_proj=[torch.zeros(H, I)] * (E - 1) + [torch.zeros(I, H)])
    with pytest.raises(ValueError, match="down_proj"):
        layer.load_expert_weights(**bad)


def test_update_selection_bias_follows_the_formula():
    layer = _layer()
    ids = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 4, 5]], dtype=torch.int32)
    counts = torch.bincount(ids.flatten().long(), minlength=E).float()
    delta = counts / ids.numel() - 1.0 / E
    layer.update_selection_bias(ids, lr=0.01)
    torch.testing.assert_close(layer.expert_bias, -0.01 * delta / delta.norm())
    # Perfect balance: nothing to correct, and no division by zero.
    before = layer.expert_bias.clone()
    layer.update_selection_bias(torch.arange(E, dtype=torch.int32).reshape(2, 4), lr=0.01)
    assert torch.equal(layer.expert_bias, before)


def test_bias_changes_selection_and_training_records_ids():
    layer = _layer().train()
    x = torch.randn(16, H)
    layer(x)
    ids_before = layer.last_topk_ids.clone()
    layer.expert_bias[ids_before[0, 0].long()] = -10.0  # that expert can no longer win
    layer(x)
    assert not (layer.last_topk_ids[0] == ids_before[0, 0]).any()
    assert not layer.expert_bias.requires_grad


def test_gradients_reach_every_parameter():
    layer = _layer()
    layer(torch.randn(9, H)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs,arg", [
    (dict(top_k=E + 1), "top_k"), (dict(top_k=0), "top_k"), (dict(group_size=3), "group_size"),
    (dict(hidden_size=0), "hidden_size"), (dict(adjugate_intermediate_size=0),
                                           "adjugate_intermediate_size"),
])
def test_bad_constructor_arguments(kwargs, arg):
    args = dict(hidden_size=H, intermediate_size=I, num_experts=E, top_k=K, group_size=S,
                adjugate_intermediate_size=IA)
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        gk.GroveMoE(**args)


def test_wrong_hidden_size_is_named():
    with pytest.raises(ValueError, match="hidden_states"):
        _layer()(torch.randn(4, H + 1))


def test_dtype_cast_keeps_selection_bias_fp32():
    layer = _layer()
    layer.expert_bias.fill_(1e-3 / 3)
    layer.to(torch.bfloat16)
    assert layer.w1.dtype == torch.bfloat16
    assert layer.expert_bias.dtype == torch.float32 and layer.expert_bias[0] == 1e-3 / 3
