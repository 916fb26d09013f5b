"""GroveMoeConfig: the fields of a released GroveMoE / Qwen3-MoE config.json.

config.json (dict) --from_json--> GroveMoeConfig --to_dict--> dict (json-serialisable)

Shape letters used across grove_model: V vocab, H hidden_size, L layers, nq / nkv attention /
key-value heads, D head_dim, E num_experts, k num_experts_per_tok, I moe_intermediate_size,
Im intermediate_size (dense layers), S experts_per_group, G = E / S adjugate experts,
Ia adjugate_intermediate_size, λ adjugate_scale.

Defaults are the shapes of GroveMoE-Base/Inst (upcycled from Qwen3-30B-A3B). The released
config.json does not carry the three Grove fields (its modeling code hard-codes them), so they
default to S = 2, Ia = 128, λ = 0.05 when absent.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}


def to_dtype(name: str) -> torch.dtype:
    """torch dtype of a config.json dtype name ("bfloat16", "float32", ...)."""
    if name not in _DTYPES:
        raise ValueError(f"torch_dtype: unknown dtype {name!r}, expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class GroveMoeConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144          # Im: dense (mlp_only) layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: Optional[int] = 128          # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict] = None    # only None (plain RoPE) is implemented
    max_position_embeddings: int = 40960
    moe_intermediate_size: int = 768
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    torch_dtype: Optional[str] = "bfloat16"
    initializer_range: float = 0.02
    use_sliding_window: bool = False
    sliding_window: Optional[int] = None
    max_window_layers: int = 48
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    use_cache: bool = True
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[Union[int, list]] = 151645
    model_type: str = "grove_moe"
    architectures: list = field(default_factory=lambda: ["GroveMoeForCausalLM"])
    # Grove fields: absent from the released config.json, hard-coded by its modeling code.
    experts_per_group: int = 2
    adjugate_intermediate_size: int = 128
    adjugate_scale: float = 0.05

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            raise ValueError(f"rope_scaling: only None is supported, got {self.rope_scaling!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_experts > 0 and self.num_experts % self.experts_per_group:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be a multiple of "
                f"experts_per_group ({self.experts_per_group})")

    # --- derived -------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.num_experts // self.experts_per_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def dtype(self) -> torch.dtype:
        """torch dtype named by torch_dtype (float32 when unset)."""
        return to_dtype(self.torch_dtype or "float32")

    # --- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_json(cls, source: Union[str, os.PathLike, dict]) -> "GroveMoeConfig":
        """Build from a config.json path, a directory holding one, or an already parsed dict.

        Unknown keys (auto_map, transformers_version, ...) are ignored so that released configs
        load unchanged.
        """
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        # Newer transformers write "dtype" where older ones wrote "torch_dtype".
        if "torch_dtype" not in raw and "dtype" in raw:
            raw["torch_dtype"] = raw["dtype"]
        if isinstance(raw.get("torch_dtype"), torch.dtype):
            raw["torch_dtype"] = str(raw["torch_dtype"]).removeprefix("torch.")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
