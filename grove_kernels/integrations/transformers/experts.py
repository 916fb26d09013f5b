"""The "grove_kernels" experts implementation for transformers' ExpertsInterface.

A transformers experts module (a class decorated with `use_experts_implementation`) holds
gate_up_proj [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up: the layout of `fused_experts`' w1) and
down_proj [E, H, I]; its forward is dispatched on `config._experts_implementation`:

    x [T, H], top_k_index [T, k], top_k_weights [T, k]
      -> fused_experts(x, gate_up_proj, down_proj, top_k_weights, top_k_index) -> y [T, H]

Forward and backward run on grove_kernels' backend (gk.set_backend / use_backend), with
gradients reaching x, both weights and the routing weights. Modules whose experts are not
SwiGLU experts in that layout are refused by name of the feature, never run approximately.
"""
import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from ... import api

NAME = "grove_kernels"


class UnsupportedExpertsError(NotImplementedError):
    """An experts module this implementation cannot run: the message names the feature."""


def _refuse(module, feature, hint):
    raise UnsupportedExpertsError(
        f"experts_implementation={NAME!r} cannot run {type(module).__name__}: {feature} is not "
        f"supported ({hint}); load the model with experts_implementation='grouped_mm' or "
        f"'eager' instead")


def _is_silu(act):
    if isinstance(act, nn.SiLU) or act is torch.nn.functional.silu:
        return True
    # transformers' own SiLUActivation (ACT2FN["silu"]) only calls F.silu.
    return type(act).__name__ == "SiLUActivation"


def check_experts_module(module):
    """Raise UnsupportedExpertsError unless `module` holds plain SwiGLU experts in the
    concatenated [gate; up] layout on every expert of the model (no expert parallel)."""
    if not getattr(module, "has_gate", True):
        _refuse(module, "non-gated experts (has_gate=False)", "the kernels compute SwiGLU experts")
    if getattr(module, "has_bias", False):
        _refuse(module, "expert biases (has_bias=True)", "the kernels have no bias term")
    if getattr(module, "is_transposed", False):
        _refuse(module, "transposed expert weights (is_transposed=True)",
                "expected gate_up_proj [E, 2I, H] and down_proj [E, H, I]")
    if not getattr(module, "is_concatenated", True):
        _refuse(module, "interleaved gate/up weights (is_concatenated=False)",
                "expected gate rows 0..I-1 then up rows I..2I-1")
    if getattr(module, "has_post_expert_norm", False):
        _refuse(module, "a post-expert norm (has_post_expert_norm=True)",
                "the kernels weight and sum the down projections directly")
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        _refuse(module, "a custom gating function (_apply_gate)",
                "the kernels compute silu(gate) * up")
    act = getattr(module, "act_fn", None)
    if not _is_silu(act):
        _refuse(module, f"the activation {type(act).__name__}", "only silu (SwiGLU) is supported")
    if getattr(module, "_is_expert_parallel", False) or any(
            type(p).__name__ == "DTensor" for p in (module.gate_up_proj, module.down_proj)):
        _refuse(module, "expert parallel (sharded experts)",
                "use grove_kernels.distributed for Grove layers, or shard outside transformers")


def grove_kernels_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """ExpertsInterface contract: (module, x [T, H], top_k_index [T, k], top_k_weights [T, k])
    -> [T, H] in the dtype of hidden_states."""
    check_experts_module(self)
    w1, w2 = self.gate_up_proj, self.down_proj
    # Under autocast the activations may arrive in fp32 beside bf16 weights; the kernels take
    # one dtype, that of the weights (as transformers' grouped_mm path does).
    x = hidden_states.to(w1.dtype)
    y = api.fused_experts(x, w1, w2, top_k_weights, top_k_index)
    return y.to(hidden_states.dtype)


def register():
    """Register NAME in transformers' ExpertsInterface (idempotent)."""
    ExpertsInterface.register(NAME, grove_kernels_experts_forward)
