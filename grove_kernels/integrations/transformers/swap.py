"""apply_grove_kernels: swap the sparse blocks of a model built from the released GroveMoE remote
code for fused grove_kernels blocks, in place, keeping the model's state_dict names.

A released block (GroveMoeSparseMoeBlock) holds gate [E, H], the buffer expert_bias [E],
experts = ModuleList of E SwiGLU MLPs (gate_proj / up_proj [I, H], down_proj [H, I]) and
chunk_experts = ModuleList of G = E / S adjugate MLPs (Ia), and loops over them in Python,
computing an adjugate once per selected expert. Its replacement, ReleasedLayoutGroveMoE, is a
GroveMoE (packed w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia]; one adjugate per
(token, group) with the group's summed weight: equal in exact arithmetic) whose state_dict
shows, and whose load_state_dict accepts, the released per-expert names, so save_pretrained
writes the released format.
"""
import torch
from torch import nn

from ...layer import GroveMoE
from .modeling import GroveMoeSparseMoeBlock

_PROJS = ("gate_proj", "up_proj", "down_proj")
_PACKED = (("experts", "w1", "w2"), ("chunk_experts", "a1", "a2"))


class ReleasedLayoutGroveMoE(GroveMoeSparseMoeBlock):
    """A GroveMoE (GroveMoeSparseMoeBlock: use_expert_bias chooses the selection) whose
    state_dict uses the released names: experts.{e}.{gate,up,down}_proj.weight and
    chunk_experts.{g}.* instead of w1 / w2 / a1 / a2 (copies, not views: the released format
    stores every expert apart). load_state_dict takes either naming."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_state_dict_post_hook(_split_packed)
        self.register_load_state_dict_pre_hook(_pack_released)


def _split_packed(module, state_dict, prefix, local_metadata):
    for kind, gate_up_name, down_name in _PACKED:
        gate_up = state_dict.pop(prefix + gate_up_name).detach()
        down = state_dict.pop(prefix + down_name).detach()
        inter = gate_up.shape[1] // 2
        for j in range(gate_up.shape[0]):
            p = f"{prefix}{kind}.{j}."
            state_dict[p + "gate_proj.weight"] = gate_up[j, :inter].clone()
            state_dict[p + "up_proj.weight"] = gate_up[j, inter:].clone()
            state_dict[p + "down_proj.weight"] = down[j].clone()


def _pack_released(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs):
    for kind, gate_up_name, down_name in _PACKED:
        n = (module.w1 if kind == "experts" else module.a1).shape[0]
        names = [f"{prefix}{kind}.{j}.{proj}.weight" for j in range(n) for proj in _PROJS]
        if not any(name in state_dict for name in names):
            continue  # packed names (or nothing): load_state_dict reports what is missing
        absent = [name for name in names if name not in state_dict]
        if absent:
            error_msgs.append(f"missing per-expert tensor(s) for {prefix}{kind}: "
                              f"{', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}")
            for name in names:
                state_dict.pop(name, None)
            continue
        t = {name: state_dict.pop(name) for name in names}
        state_dict[prefix + gate_up_name] = torch.stack([
            torch.cat([t[f"{prefix}{kind}.{j}.gate_proj.weight"],
                       t[f"{prefix}{kind}.{j}.up_proj.weight"]]) for j in range(n)])
        state_dict[prefix + down_name] = torch.stack(
            [t[f"{prefix}{kind}.{j}.down_proj.weight"] for j in range(n)])


def _is_released_block(module):
    return (isinstance(getattr(module, "gate", None), nn.Linear)
            and isinstance(getattr(module, "experts", None), nn.ModuleList)
            and isinstance(getattr(module, "chunk_experts", None), nn.ModuleList)
            and not isinstance(module, GroveMoE))


def _linear_weight(block, kind, j, proj):
    layer = getattr(getattr(block, kind)[j], proj)
    if getattr(layer, "bias", None) is not None:
        raise ValueError(f"{kind}.{j}.{proj}: has a bias; Grove experts have none")
    return layer.weight


@torch.no_grad()
def fused_block_from_released(block, *, adjugate_scale=0.05, group_size=None, renormalize=True,
                              use_expert_bias=False):
    """A ReleasedLayoutGroveMoE holding the weights of a released block (copies, on the same
    device and dtype). Sizes come from the weights; group_size from the block's
    num_experts_per_group (the release: 2) unless given. The defaults are the released
    forward's: weights renormalized whatever norm_topk_prob says, expert_bias not used."""
    E, H = block.gate.weight.shape
    G = len(block.chunk_experts)
    if len(block.experts) != E:
        raise ValueError(f"experts: the router has {E} outputs but the block holds "
                         f"{len(block.experts)} experts")
    S = group_size if group_size is not None else getattr(block, "num_experts_per_group", E // G)
    if S * G != E:
        raise ValueError(f"group_size: {E} experts in {G} chunk_experts need group_size "
                         f"{E / G:g}, got {S}")
    act = getattr(block.experts[0], "act_fn", None)
    if act is not None and not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        raise ValueError(f"experts.0.act_fn: Grove experts are SwiGLU (silu), got "
                         f"{type(act).__name__}")
    top_k = getattr(block, "top_k", None)
    if top_k is None:
        raise ValueError("top_k: the block has no top_k attribute; pass a released block")
    w = block.experts[0].gate_proj.weight
    I = w.shape[0]
    Ia = block.chunk_experts[0].gate_proj.weight.shape[0]
    fused = ReleasedLayoutGroveMoE(H, I, E, int(top_k), S, Ia, adjugate_scale,
                                   renormalize=renormalize, use_expert_bias=use_expert_bias,
                                   device=w.device, dtype=w.dtype)
    fused.gate.weight.copy_(block.gate.weight)
    bias = getattr(block, "expert_bias", None)
    if bias is not None:
        fused.expert_bias.copy_(bias)

    def stacked(kind, n, proj):
        return [_linear_weight(block, kind, j, proj) for j in range(n)]

    fused.load_expert_weights(*(stacked("experts", E, p) for p in _PROJS),
                              *(stacked("chunk_experts", G, p) for p in _PROJS))
    fused.train(block.training)
    # A frozen block stays frozen (e.g. adapters trained beside it).
    experts_trainable = block.experts[0].gate_proj.weight.requires_grad
    for p in (fused.w1, fused.w2, fused.a1, fused.a2):
        p.requires_grad_(experts_trainable)
    fused.gate.weight.requires_grad_(block.gate.weight.requires_grad)
    return fused


def apply_grove_kernels(model, *, adjugate_scale=0.05, group_size=None, renormalize=True,
                        use_expert_bias=False):
    """Replace, in place, every released Grove sparse block of `model` (a module with a
    `gate` Linear and `experts` / `chunk_experts` ModuleLists) by a fused
    ReleasedLayoutGroveMoE with the same weights; returns the number of blocks swapped (0
    raises: nothing to swap is a mistake, not a no-op).

    Routing as the released forward: softmax weights of the top-k of sigmoid(logits),
    renormalized; the adjugate output scaled by adjugate_scale (0.05 in the release).
    use_expert_bias=True adds expert_bias to the selection scores (grove_model's and
    GroveMoeForCausalLM's routing, for training with GroveMoE.update_selection_bias).
    Optimizers built before the swap hold the old parameters: build them after."""
    targets = [(name, module) for name, module in model.named_modules()
               if _is_released_block(module)]
    if not targets:
        raise ValueError("model: no released Grove sparse block found (a module with a `gate` "
                         "Linear and `experts` / `chunk_experts` ModuleLists)")
    for name, block in targets:
        if not name:
            raise ValueError("model: is itself a sparse block; wrap it or call "
                             "fused_block_from_released")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, fused_block_from_released(
            block, adjugate_scale=adjugate_scale, group_size=group_size,
            renormalize=renormalize, use_expert_bias=use_expert_bias))
    return len(targets)
