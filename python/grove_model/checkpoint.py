"""The released GroveMoE checkpoint format: safetensors files <-> GroveMoeForCausalLM.

dir/config.json + dir/model.safetensors, or dir/model-0000i-of-0000n.safetensors with
dir/model.safetensors.index.json ({"weight_map": {name: file}}). Names per layer i (sparse):

  model.layers.{i}.mlp.gate.weight                        [E, H]      router
  model.layers.{i}.mlp.expert_bias                        [E]         selection bias (fp32)
  model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight  [I, H]      e < E
  model.layers.{i}.mlp.experts.{e}.down_proj.weight       [H, I]
  model.layers.{i}.mlp.chunk_experts.{g}.{gate,up}_proj.weight  [Ia, H]   g < G (adjugates)
  model.layers.{i}.mlp.chunk_experts.{g}.down_proj.weight       [H, Ia]

dense layers hold model.layers.{i}.mlp.{gate,up}_proj.weight [Im, H], down_proj [H, Im]; the
attention, norms, embedding and lm_head carry the module paths of modeling.py unchanged.

Loading packs the per-expert tensors into GroveMoE's w1 [E, 2I, H] = [gate; up], w2 [E, H, I],
a1 [G, 2Ia, H], a2 [G, H, Ia] through GroveMoE.load_expert_weights; saving slices them back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Callable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import GroveMoeConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: the message names the tensor(s)."""


# --- the format ----------------------------------------------------------------------------------
def released_shapes(config: GroveMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the released format for `config`, with its shape, in file order."""
    c = config
    H, D, V = c.hidden_size, c.head_dim, c.vocab_size
    nq, nkv = c.num_attention_heads, c.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        for proj, out_f, in_f in (("q", nq * D, H), ("k", nkv * D, H), ("v", nkv * D, H),
                                  ("o", H, nq * D)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (out_f, in_f)
            if c.attention_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (out_f,)
        shapes[p + "self_attn.q_norm.weight"] = (D,)
        shapes[p + "self_attn.k_norm.weight"] = (D,)
        if c.is_moe_layer(i):
            shapes.update(_moe_shapes(c, p + "mlp."))
        else:
            Im = c.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (Im, H)
            shapes[p + "mlp.up_proj.weight"] = (Im, H)
            shapes[p + "mlp.down_proj.weight"] = (H, Im)
    shapes["model.norm.weight"] = (H,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _moe_shapes(c: GroveMoeConfig, p: str) -> dict[str, tuple[int, ...]]:
    H, E, I, Ia = c.hidden_size, c.num_experts, c.moe_intermediate_size, c.adjugate_intermediate_size
    shapes = {p + "gate.weight": (E, H), p + "expert_bias": (E,)}
    for kind, n, inter in (("experts", E, I), ("chunk_experts", c.num_groups, Ia)):
        for j in range(n):
            shapes[f"{p}{kind}.{j}.gate_proj.weight"] = (inter, H)
            shapes[f"{p}{kind}.{j}.up_proj.weight"] = (inter, H)
            shapes[f"{p}{kind}.{j}.down_proj.weight"] = (H, inter)
    return shapes


def released_tensors(model: torch.nn.Module,
                     of: Callable[[torch.Tensor], Optional[torch.Tensor]] = lambda t: t.detach(),
                     ) -> dict[str, torch.Tensor]:
    """{released name: of(model tensor)}; names whose of() is None are left out.

    `of` picks what to export: the values (default) or e.g. `lambda p: p.grad` for gradients.
    Expert tensors are views (slices) of the packed w1/w2/a1/a2 (or of their gradients).
    """
    config: GroveMoeConfig = model.config
    moe = model.moe_blocks()
    moe_prefixes = tuple(f"model.layers.{i}.mlp." for i in moe)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        # Tied weights appear twice in state_dict; the released file stores the embedding only.
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.startswith(moe_prefixes):
            continue
        value = of(t)
        if value is not None:
            out[name] = value
    I, Ia = config.moe_intermediate_size, config.adjugate_intermediate_size
    for i, block in moe.items():
        p = f"model.layers.{i}.mlp."
        for name, t in ((p + "gate.weight", block.gate.weight), (p + "expert_bias", block.expert_bias)):
            value = of(t)
            if value is not None:
                out[name] = value
        for kind, up_down, inter in (("experts", (block.w1, block.w2), I),
                                     ("chunk_experts", (block.a1, block.a2), Ia)):
            gate_up, down = of(up_down[0]), of(up_down[1])
            if gate_up is None or down is None:
                continue
            for j in range(gate_up.shape[0]):
                q = f"{p}{kind}.{j}."
                out[q + "gate_proj.weight"] = gate_up[j, :inter]
                out[q + "up_proj.weight"] = gate_up[j, inter:]
                out[q + "down_proj.weight"] = down[j]
    return out


# --- reading ---------------------------------------------------------------------------------
def _checkpoint_files(path: str) -> tuple[list[str], Optional[dict[str, str]]]:
    """The safetensors files of `path` and the index's weight map (None when not sharded)."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        for f in files:
            if not os.path.exists(f):
                raise CheckpointError(f"{INDEX_FILE} lists {os.path.basename(f)}, "
                                      f"which is not in {path}")
        return files, weight_map
    # escape: a directory named like "run[1]" is a path, not a pattern.
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    return files, None


def load_weights(model: torch.nn.Module, path: Union[str, os.PathLike]) -> None:
    """Copy the checkpoint in `path` into `model` (cast to each parameter's dtype and device).

    Everything is checked before anything is copied: a tensor missing from the files, one the
    format does not expect, one stored twice, or one of the wrong shape raises CheckpointError
    naming it.
    """
    path = os.fspath(path)
    expected = released_shapes(model.config)
    files, weight_map = _checkpoint_files(path)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="pt", device="cpu")) for f in files}
        where: dict[str, str] = {}
        for f, h in handles.items():
            for name in h.keys():
                if name in where:
                    raise CheckpointError(f"tensor {name} is stored twice: in "
                                          f"{os.path.basename(where[name])} and {os.path.basename(f)}")
                where[name] = f
        if weight_map is not None:
            for name, f in weight_map.items():
                if where.get(name) != os.path.join(path, f):
                    raise CheckpointError(f"{INDEX_FILE} puts tensor {name} in {f}, "
                                          f"which does not hold it")
        missing = [n for n in expected if n not in where]
        unexpected = sorted(n for n in where if n not in expected)
        if missing or unexpected:
            msg = [f"checkpoint {path} does not match its config:"]
            if missing:
                msg.append(f"missing tensor(s): {', '.join(missing)}")
            if unexpected:
                msg.append(f"unexpected tensor(s): {', '.join(unexpected)}")
            raise CheckpointError(" ".join(msg))
        for name, shape in expected.items():
            got = tuple(handles[where[name]].get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(f"tensor {name} has shape {list(got)} in "
                                      f"{os.path.basename(where[name])}, expected {list(shape)}")

        def read(name: str) -> torch.Tensor:
            return handles[where[name]].get_tensor(name)

        _copy_into(model, expected, read)


@torch.no_grad()
def _copy_into(model: torch.nn.Module, expected: dict, read: Callable[[str], torch.Tensor]) -> None:
    config: GroveMoeConfig = model.config
    moe = model.moe_blocks()
    state = model.state_dict(keep_vars=True)
    moe_prefixes = tuple(f"model.layers.{i}.mlp." for i in moe)
    for name in expected:
        if not name.startswith(moe_prefixes):
            dest = state[name]
            dest.copy_(read(name))
    for i, block in moe.items():
        p = f"model.layers.{i}.mlp."
        block.gate.weight.copy_(read(p + "gate.weight"))
        block.expert_bias.copy_(read(p + "expert_bias"))

        def stack(kind: str, n: int, proj: str) -> list[torch.Tensor]:
            return [read(f"{p}{kind}.{j}.{proj}.weight") for j in range(n)]

        E, G = config.num_experts, config.num_groups
        block.load_expert_weights(
            stack("experts", E, "gate_proj"), stack("experts", E, "up_proj"),
            stack("experts", E, "down_proj"), stack("chunk_experts", G, "gate_proj"),
            stack("chunk_experts", G, "up_proj"), stack("chunk_experts", G, "down_proj"))


def read_checkpoint(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory as stored (any layout), by name, on the CPU."""
    files, _ = _checkpoint_files(os.fspath(path))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt", device="cpu") as h:
            for name in h.keys():
                out[name] = h.get_tensor(name)
    return out


# --- writing ---------------------------------------------------------------------------------
def write_tensors(path: Union[str, os.PathLike], tensors: dict[str, torch.Tensor],
                  max_shard_size: Optional[int] = None) -> None:
    """Write `tensors` as model.safetensors, or as shards of at most max_shard_size bytes
    (a single tensor larger than that gets a shard of its own) plus the index.

    Earlier model*.safetensors files and index in `path` are removed first: the loader reads
    every *.safetensors file of an unsharded directory, so stale ones would collide.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    pattern_dir = glob.escape(path)
    for old in glob.glob(os.path.join(pattern_dir, "model*.safetensors")) + \
            glob.glob(os.path.join(pattern_dir, glob.escape(INDEX_FILE))):
        os.remove(old)
    # safetensors refuses tensors sharing storage (expert slices of one packed weight): copy.
    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in tensors.items()}
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(tensors, os.path.join(path, SINGLE_FILE), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=metadata)
        weight_map.update({name: fname for name in shard})
    with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def save_weights(model: torch.nn.Module, path: Union[str, os.PathLike],
                 max_shard_size: Optional[int] = None) -> None:
    write_tensors(path, released_tensors(model), max_shard_size=max_shard_size)


def random_tensors(config: GroveMoeConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                   expert_bias_std: float = 0.1) -> dict[str, torch.Tensor]:
    """Random weights in the released format whose activations stay O(1) through the layers:
    matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2), embedding N(0, 1), biases
    N(0, 0.1^2), expert_bias N(0, expert_bias_std^2) kept fp32 as in the release."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in released_shapes(config).items():
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("expert_bias"):
            out[name] = t * expert_bias_std
            continue
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * t
        elif name.endswith(".bias"):
            t = 0.1 * t
        elif name != "model.embed_tokens.weight":
            t = t / shape[1] ** 0.5
        out[name] = t.to(dtype)
    return out


def write_random_checkpoint(path: Union[str, os.PathLike], config: GroveMoeConfig, seed: int = 0,
                            dtype: torch.dtype = torch.float32, expert_bias_std: float = 0.1,
                            max_shard_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Write config.json + random weights (see random_tensors) to `path`; returns the tensors."""
    tensors = random_tensors(config, seed, dtype, expert_bias_std)
    os.makedirs(path, exist_ok=True)
    dataclasses.replace(config, torch_dtype=str(dtype).removeprefix("torch.")).to_json(
        os.path.join(path, "config.json"))
    write_tensors(path, tensors, max_shard_size=max_shard_size)
    return tensors
