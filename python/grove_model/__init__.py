"""grove_model: a thin Grove transformer (Qwen3-MoE with Grove MoE blocks) on grove_kernels.

  GroveMoeConfig.from_json(dir | path | dict) -> config
  GroveMoeForCausalLM.from_pretrained(dir, dtype=None, device=None) -> model
  model(input_ids [B, S]) -> float32 logits [B, S, V];  model.save_pretrained(dir)
  write_random_checkpoint(dir, config, seed) -> {released name: tensor}   (for tests)

model.model.layers[i].mlp is a grove_kernels.GroveMoE on sparse layers.

Needs no transformers. grove_kernels.integrations.transformers.GroveMoeForCausalLM (the model
for transformers: KV cache, generate, Trainer) builds its Grove blocks and dense MLPs with this
package's make_grove_block / DenseMLP and is tested equal to this model on its checkpoints.
"""
from .checkpoint import (CheckpointError, load_weights, random_tensors, read_checkpoint,
                         released_shapes, released_tensors, save_weights, write_random_checkpoint,
                         write_tensors)
from .config import GroveMoeConfig
from .modeling import (Attention, DecoderLayer, DenseMLP, GroveMoeForCausalLM, GroveMoeModel,
                       RMSNorm)

__all__ = [
    "GroveMoeConfig", "GroveMoeForCausalLM", "GroveMoeModel", "DecoderLayer", "Attention",
    "DenseMLP", "RMSNorm", "CheckpointError", "released_shapes", "released_tensors",
    "load_weights", "save_weights", "read_checkpoint", "write_tensors", "random_tensors",
    "write_random_checkpoint",
]
