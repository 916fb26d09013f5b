"""GroveMoE for transformers (model_type "grove_moe"): the released GroveMoE-Base/Inst without
trust_remote_code, its sparse blocks on grove_kernels.

The model is Qwen3-MoE's (attention with q/k norm and RoPE, KV cache, masks, attention
backends, generate) with every sparse block a grove_kernels.GroveMoE and every dense MLP built
by grove_model (the package's reference Grove transformer, which runs without transformers and
reads and writes the same checkpoints; the two are tested equal):

    input_ids [B, L] -> embed_tokens -> per layer: x += self_attn(norm(x)); x += mlp(norm(x))
      mlp: GroveMoE on sparse layers, T = B*L tokens:
        gate [E, H] -> logits [T, E] -> grove_topk(+ expert_bias [E]) -> w, ids [T, k]
        -> fused_grove_experts(w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia])
      a SwiGLU MLP [Im] elsewhere
    -> norm -> lm_head -> logits [B, L, V]

Checkpoints are read and written in the released format: the per-expert tensors
mlp.experts.{e}.{gate,up,down}_proj.weight and mlp.chunk_experts.{g}.* are packed into w1 / w2
/ a1 / a2 on load and split back on save by a weight conversion that transformers applies to
GroveMoeKernelsModel (and so to the `model` of GroveMoeForCausalLM).
"""
import inspect

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (Qwen3MoeAttention,
                                                              Qwen3MoeDecoderLayer,
                                                              Qwen3MoeForCausalLM, Qwen3MoeModel,
                                                              Qwen3MoePreTrainedModel,
                                                              Qwen3MoeRMSNorm,
                                                              Qwen3MoeRotaryEmbedding)

from ... import api
from ...layer import GroveMoE

MODEL_TYPE = "grove_moe"
_NO_ROUTER_LOGITS = (
    "output_router_logits: GroveMoE selects experts by sigmoid(logits) + expert_bias and balances "
    "them with GroveMoE.update_selection_bias; the Qwen3-MoE auxiliary loss does not apply")


@strict
class GroveMoeConfig(Qwen3MoeConfig):
    """The released GroveMoE config: Qwen3-MoE's keys plus the Grove fields, which the released
    config.json omits (its modeling code hard-codes them) and which default to the release:
    experts_per_group S = 2, adjugate_intermediate_size Ia = 128, adjugate_scale λ = 0.05."""

    model_type = MODEL_TYPE
    # The released config.json says "num_experts"; Qwen3MoeConfig would write it under another key.
    attribute_map = {}
    base_model_ep_plan = None
    experts_per_group: int = 2
    adjugate_intermediate_size: int = 128
    adjugate_scale: float = 0.05
    # Selection by sigmoid(logits) + expert_bias (grove_model's routing); False: by
    # sigmoid(logits) alone, as the released remote code's forward (which never reads the bias).
    use_expert_bias: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: GroveMoE experts are SwiGLU, only 'silu' is supported, "
                             f"got {self.hidden_act!r}")
        if self.output_router_logits:
            raise NotImplementedError(_NO_ROUTER_LOGITS)
        if self.experts_per_group < 1 or (self.num_experts > 0
                                          and self.num_experts % self.experts_per_group):
            raise ValueError(f"experts_per_group: must be >= 1 and divide num_experts="
                             f"{self.num_experts}, got {self.experts_per_group}")

    def to_dict(self):
        out = super().to_dict()
        # The released config.json (and its remote code, and grove_model) read rope_theta;
        # transformers 5 keeps it inside rope_parameters and reads either.
        rope = out.get("rope_parameters") or {}
        if "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        return out

    @property
    def num_groups(self):
        return self.num_experts // self.experts_per_group

    def is_moe_layer(self, layer_idx):
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


class GroveMoeSparseMoeBlock(GroveMoE):
    """GroveMoE whose selection may leave expert_bias out: use_expert_bias=False ranks experts
    by sigmoid(logits) alone, as the released remote code's forward does (it holds
    expert_bias, loads and saves it, and never reads it). With True (GroveMoE's routing)
    update_selection_bias steers selection."""

    def __init__(self, *args, use_expert_bias=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_expert_bias = bool(use_expert_bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, use_expert_bias={self.use_expert_bias}"

    def route(self, hidden_states):
        if self.use_expert_bias:
            return super().route(hidden_states)
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states: expected last dimension {self.hidden_size}, got "
                             f"shape {tuple(hidden_states.shape)}")
        x = hidden_states.reshape(-1, self.hidden_size)
        weights, ids = api.grove_topk(self.gate(x), self.top_k, renormalize=self.renormalize)
        if self.training:
            self.last_topk_ids = ids.detach()
        return x, weights, ids


def _building_blocks():
    # grove_model is the package's reference Grove transformer; the blocks are built once, there.
    from grove_model.modeling import DenseMLP, make_grove_block

    return DenseMLP, make_grove_block


class GroveMoeDecoderLayer(Qwen3MoeDecoderLayer):
    """Qwen3-MoE's decoder layer (its forward) with grove_model's Grove block or dense MLP."""

    def __init__(self, config, layer_idx):
        GradientCheckpointingLayer.__init__(self)
        DenseMLP, make_grove_block = _building_blocks()
        self.self_attn = Qwen3MoeAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = make_grove_block(config, cls=GroveMoeSparseMoeBlock,
                                        use_expert_bias=config.use_expert_bias)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3MoeRMSNorm(config.hidden_size,
                                                        eps=config.rms_norm_eps)
        self.hidden_size = config.hidden_size


class GroveMoePreTrainedModel(Qwen3MoePreTrainedModel):
    config_class = GroveMoeConfig
    config: GroveMoeConfig
    _no_split_modules = ["GroveMoeDecoderLayer"]
    # The selection bias takes 1e-3 steps: bf16 would round them away (the release keeps it fp32).
    _keep_in_fp32_modules_strict = ["expert_bias"]
    _can_record_outputs = {"hidden_states": GroveMoeDecoderLayer,
                           "attentions": Qwen3MoeAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GroveMoE):
            std = self.config.initializer_range
            for p in (module.w1, module.w2, module.a1, module.a2, module.gate.weight):
                init.normal_(p, mean=0.0, std=std)
            init.zeros_(module.expert_bias)


class GroveMoeKernelsModel(GroveMoePreTrainedModel, Qwen3MoeModel):
    """Qwen3MoeModel's forward over GroveMoeDecoderLayers (AutoModel for "grove_moe").

    Its class name is the key of the released-format conversion in transformers' registry:
    the released remote code owns the names GroveMoeModel / GroveMoeForCausalLM and the
    model_type, and a conversion registered under those would also rewrite the checkpoint of a
    model built from that remote code (whose experts stay per-expert modules)."""

    def __init__(self, config):
        GroveMoePreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(GroveMoeDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3MoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class GroveMoeForCausalLM(GroveMoePreTrainedModel, Qwen3MoeForCausalLM):
    """Causal LM head over GroveMoeModel: Qwen3MoeForCausalLM's forward (loss, cache) and
    generate(); the released-format conversion applies to its `model` (GroveMoeKernelsModel).
    Router logits are not recorded (the released model trains without an
    auxiliary loss: its selection bias balances the experts, see GroveMoE.update_selection_bias)."""

    def __init__(self, config):
        GroveMoePreTrainedModel.__init__(self, config)
        self.model = GroveMoeKernelsModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(self, *args, **kwargs):
        if kwargs.get("output_router_logits"):
            raise NotImplementedError(_NO_ROUTER_LOGITS)
        return super().forward(*args, **kwargs)

    # The Trainer and generate() read the parameters of forward: show Qwen3-MoE's.
    forward.__signature__ = inspect.signature(Qwen3MoeForCausalLM.forward)

    def moe_blocks(self):
        """{layer index: GroveMoE} of the sparse layers."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers)
                if isinstance(layer.mlp, GroveMoE)}


def released_format_conversion():
    """Released per-expert tensors <-> the packed GroveMoE weights (reversed when saving)."""
    converters = []
    for kind, gate_up, down in (("experts", "w1", "w2"), ("chunk_experts", "a1", "a2")):
        converters.append(WeightConverter(
            source_patterns=[f"mlp.{kind}.*.gate_proj.weight", f"mlp.{kind}.*.up_proj.weight"],
            target_patterns=f"mlp.{gate_up}",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)]))
        converters.append(WeightConverter(
            source_patterns=[f"mlp.{kind}.*.down_proj.weight"],
            target_patterns=f"mlp.{down}",
            operations=[MergeModulelist(dim=0)]))
    return converters


def register():
    """Register the config, the models and the checkpoint conversion under "grove_moe"
    (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping

    AutoConfig.register(MODEL_TYPE, GroveMoeConfig, exist_ok=True)
    AutoModel.register(GroveMoeConfig, GroveMoeKernelsModel, exist_ok=True)
    AutoModelForCausalLM.register(GroveMoeConfig, GroveMoeForCausalLM, exist_ok=True)
    register_checkpoint_conversion_mapping(GroveMoeKernelsModel.__name__,
                                           released_format_conversion(), overwrite=True)
