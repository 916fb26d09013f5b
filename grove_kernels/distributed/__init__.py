"""Expert parallel Grove MoE on torch.distributed (docs/design.md §2).

Groups are sharded whole (rank r of P holds G/P consecutive groups, their S·G/P experts and
their adjugates), so an adjugate is computed once per (token, group), on its group's rank.

    dispatch_grove_experts    x [T, H] (this rank's tokens), routing [T, k] (global ids),
                              local w1/w2/a1/a2 -> y [T, H]: token-once all_to_all dispatch,
                              combine summed in rank order
    allreduce_grove_experts   the same x and routing on every rank -> y [T, H] (all-reduce)
    expert_parallel_grove_moe router logits [T, E] + either of the above (gk.grove_moe's form)
    ExpertParallelGroveMoE    the nn.Module (local shard, replicated router); from_full / shard
    shard_experts, local_expert_range, local_expert_map   the sharding, as tensors and ranges

functional.py holds the dataflow and its host-sync notes; layer.py the module.
"""
from .functional import (DispatchInfo, allreduce_grove_experts, dispatch_grove_experts,
                         expert_parallel_grove_moe, local_expert_map, local_expert_range,
                         resolve_group)
from .layer import ExpertParallelGroveMoE, shard_experts

__all__ = [
    "DispatchInfo", "ExpertParallelGroveMoE", "allreduce_grove_experts",
    "dispatch_grove_experts", "expert_parallel_grove_moe", "local_expert_map",
    "local_expert_range", "resolve_group", "shard_experts",
]
