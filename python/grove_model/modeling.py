"""A thin Grove transformer: Qwen3-MoE attention + Grove MoE blocks from grove_kernels.

Dataflow (B batch, S sequence, H hidden, V vocab, nq/nkv heads, D head_dim, T = B*S tokens):

  input_ids [B, S] -> embed_tokens -> x [B, S, H]
  per layer i:
    h = input_layernorm(x)                                        [B, S, H]
    q = q_norm(q_proj(h) as [B, S, nq, D]);  k = k_norm(k_proj(h) as [B, S, nkv, D])
    q, k = RoPE(q, k, positions, rope_theta);  v = v_proj(h) as  [B, S, nkv, D]
    x = x + o_proj(causal SDPA(q, k, v) with GQA)                 [B, S, H]
    h = post_attention_layernorm(x)
    x = x + mlp(h)        mlp = grove_kernels.GroveMoE (router gate [E, H], expert_bias [E],
                          w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia]) on sparse
                          layers, a SwiGLU DenseMLP (Im) on mlp_only / off-step layers
  logits = lm_head(norm(x)) -> [B, S, V], returned as float32 (upcast after the matmul, which
  runs in the model dtype), so a loss on it is taken in fp32 whatever the model dtype.

Parameter names follow the released checkpoint (model.layers.{i}.self_attn.q_proj.weight, ...)
except the packed expert weights of GroveMoE; checkpoint.py maps those to the per-expert
released names (mlp.experts.{e}.*, mlp.chunk_experts.{g}.*).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

import grove_kernels as gk

from .config import GroveMoeConfig, to_dtype


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [B, S, D] for integer positions [B, S]; angles in fp32 as Qwen3 does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim)       # [D/2]
    freqs = positions.float()[..., None] * inv_freq                            # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                    # [B, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, S, D]; rotate-half convention (first / second half of D are the pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    """Qwen3 attention: GQA, per-head RMSNorm on q and k before RoPE, causal SDPA."""

    def __init__(self, config: GroveMoeConfig, *, device=None, dtype=None):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.nq, self.nkv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.rope_theta = config.rope_theta
        kw = dict(bias=config.attention_bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(H, self.nq * D, **kw)
        self.k_proj = nn.Linear(H, self.nkv * D, **kw)
        self.v_proj = nn.Linear(H, self.nkv * D, **kw)
        self.o_proj = nn.Linear(self.nq * D, H, **kw)
        self.q_norm = RMSNorm(D, config.rms_norm_eps, device=device, dtype=dtype)
        self.k_norm = RMSNorm(D, config.rms_norm_eps, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, S, _ = h.shape
        D = self.head_dim
        q = self.q_norm(self.q_proj(h).view(B, S, self.nq, D)).transpose(1, 2)   # [B, nq, S, D]
        k = self.k_norm(self.k_proj(h).view(B, S, self.nkv, D)).transpose(1, 2)  # [B, nkv, S, D]
        v = self.v_proj(h).view(B, S, self.nkv, D).transpose(1, 2)
        cos, sin = rotary_cos_sin(positions, D, self.rope_theta, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # enable_gqa lets SDPA share each kv head across nq / nkv query heads without copies.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nq != self.nkv)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nq * D))


class DenseMLP(nn.Module):
    """SwiGLU MLP of the dense layers: down(silu(gate(x)) * up(x)), Im = intermediate_size."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_grove_block(config: GroveMoeConfig, *, device=None, dtype=None, cls=gk.GroveMoE,
                     **kwargs) -> gk.GroveMoE:
    """The Grove MoE block of a sparse layer; norm_topk_prob maps to GroveMoE's renormalize.
    cls (a GroveMoE subclass) and kwargs serve models that extend the block."""
    return cls(
        config.hidden_size, config.moe_intermediate_size, config.num_experts,
        config.num_experts_per_tok, config.experts_per_group,
        config.adjugate_intermediate_size, config.adjugate_scale,
        renormalize=config.norm_topk_prob, device=device, dtype=dtype, **kwargs)


class DecoderLayer(nn.Module):
    def __init__(self, config: GroveMoeConfig, layer_idx: int, *, device=None, dtype=None):
        super().__init__()
        H = config.hidden_size
        self.self_attn = Attention(config, device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(H, config.rms_norm_eps, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(H, config.rms_norm_eps, device=device, dtype=dtype)
        if config.is_moe_layer(layer_idx):
            self.mlp = make_grove_block(config, device=device, dtype=dtype)
        else:
            self.mlp = DenseMLP(H, config.intermediate_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class GroveMoeModel(nn.Module):
    """Embedding, decoder layers and final norm: input_ids [B, S] -> hidden [B, S, H]."""

    def __init__(self, config: GroveMoeConfig, *, device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, device=device, dtype=dtype)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids)
        return self.norm(x)


class GroveMoeForCausalLM(nn.Module):
    """GroveMoeModel + lm_head: input_ids [B, S] -> float32 logits [B, S, V]."""

    def __init__(self, config: GroveMoeConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = GroveMoeModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                 device=device, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares the embedding when config.tie_word_embeddings."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, *args, **kwargs):
        # A conversion that cannot reuse a parameter in place (to_empty off the meta device)
        # makes a new one per module, so the two sides of the tie would part.
        result = super()._apply(fn, *args, **kwargs)
        self.tie_weights()
        return result

    def forward(self, input_ids: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, position_ids)).float()

    def moe_blocks(self) -> dict[int, gk.GroveMoE]:
        """{layer index: Grove block} of the sparse layers."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers)
                if isinstance(layer.mlp, gk.GroveMoE)}

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype=None,
                        device=None) -> "GroveMoeForCausalLM":
        """Load config.json and the *.safetensors weights (single file or sharded) in `path`.

        dtype: None -> float32 (as transformers does); "auto" -> config.torch_dtype; a dtype
        name ("bfloat16") or a torch.dtype. The selection bias stays float32 whatever the dtype
        (routing runs in fp32).
        """
        from .checkpoint import load_weights

        config = GroveMoeConfig.from_json(path)
        if dtype is None:
            dtype = torch.float32
        elif dtype == "auto":
            dtype = config.dtype()
        elif isinstance(dtype, str):
            dtype = to_dtype(dtype)
        if device is None:
            device = torch.get_default_device()
        # Built on the meta device and materialised uninitialised: load_weights writes every
        # tensor, so a random init (minutes at 33B) would be thrown away.
        model = cls(config, device="meta", dtype=dtype).to_empty(device=device)
        load_weights(model, path)
        return model

    def save_pretrained(self, path: Union[str, os.PathLike],
                        max_shard_size: Optional[int] = None) -> None:
        """Write config.json + weights under the released names (sharded above max_shard_size
        bytes, with a model.safetensors.index.json)."""
        from .checkpoint import save_weights

        os.makedirs(path, exist_ok=True)
        # As transformers does, torch_dtype records the dtype the tensors are written in.
        dtype_name = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        dataclasses.replace(self.config, torch_dtype=dtype_name).to_json(
            os.path.join(path, "config.json"))
        save_weights(self, path, max_shard_size=max_shard_size)
