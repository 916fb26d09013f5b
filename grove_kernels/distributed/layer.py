"""`ExpertParallelGroveMoE`: the Grove MoE block with its experts sharded over a process group.

    x [..., H] -> gate (replicated) -> logits [T, E] -> grove_topk(+ expert_bias) -> w, ids [T, k]
               -> dispatch_grove_experts (all_to_all, this rank's tokens) or
                  allreduce_grove_experts (all_reduce, the same tokens on every rank)
                  on the local shard w1 [E_l, 2I, H], w2 [E_l, H, I], a1 [G_l, 2Ia, H],
                  a2 [G_l, H, Ia]   (E_l = E/P experts, G_l = G/P groups, consecutive)
               -> y [..., H]

The module holds only the local shard; the router (gate weight, expert_bias) is replicated.
`from_full(layer)` and `shard(...)` load the shard of this rank from a full gk.GroveMoE or
from full checkpoint tensors.
"""

import torch
import torch.distributed as dist

import grove_kernels as gk
from grove_kernels.layer import GroveBlock

from .functional import (DISPATCH_STYLES, allreduce_grove_experts, dispatch_grove_experts,
                         fail_together, local_expert_map, local_expert_range, resolve_group)


def shard_experts(w1, w2, a1, a2, *, group_size, world_size, rank):
    """The slices of full w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia] that rank
    `rank` of `world_size` holds (views; G/P whole groups per rank)."""
    for name, t in (("w1", w1), ("w2", w2), ("a1", a1), ("a2", a2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    E = w1.shape[0]
    first, last = local_expert_range(E, group_size, world_size, rank)
    G = E // group_size
    for name, t, n in (("w2", w2, E), ("a1", a1, G), ("a2", a2, G)):
        if t.shape[0] != n:
            raise ValueError(f"{name}: expected {n} rows in dimension 0 (E={E}, group_size="
                             f"{group_size}), got shape {tuple(t.shape)}")
    g0, g1 = first // group_size, last // group_size
    return w1[first:last], w2[first:last], a1[g0:g1], a2[g0:g1]


class ExpertParallelGroveMoE(GroveBlock):
    """Grove MoE block whose experts (with their groups' adjugates) are sharded over the
    ranks of `process_group` (None: the default group), G/P whole groups per rank.

    dispatch="all_to_all" (default): each rank routes and owns its own tokens; a token goes
    once to each rank holding one of its experts. dispatch="all_reduce": every rank gets the
    same tokens and the partial outputs are all-reduced. Every rank must call forward (and
    backward) together. Constructing the module broadcasts the router from the group's first
    rank; local shards are initialised from a per-rank random stream. Deferred init works as
    for GroveMoE: build on device="meta", `to_empty`, then `reset_parameters()` (every rank:
    it broadcasts the router) or a load.
    """

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, group_size=2,
                 adjugate_intermediate_size=128, adjugate_scale=0.05, *, renormalize=True,
                 process_group=None, dispatch="all_to_all", device=None, dtype=None,
                 _init=True):
        if dispatch not in DISPATCH_STYLES:
            raise ValueError(f"dispatch: expected one of {DISPATCH_STYLES}, got {dispatch!r}")
        process_group, world_size, rank = resolve_group(process_group)
        first, last = local_expert_range(num_experts, group_size, world_size, rank)
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, group_size,
                         adjugate_intermediate_size, adjugate_scale, renormalize,
                         local_experts=last - first, device=device, dtype=dtype)
        self.process_group, self.world_size, self.rank = process_group, world_size, rank
        self.dispatch = dispatch
        self.first_expert, self.num_local_experts = first, last - first
        self.num_local_groups = (last - first) // group_size
        self.register_buffer("expert_map", local_expert_map(num_experts, first, last, device),
                             persistent=False)
        self.last_dispatch = None  # DispatchInfo of the latest all_to_all forward
        if _init:
            self.reset_parameters()

    def reset_parameters(self):
        # GroveMoE's init from a per-rank stream (ranks seeded alike must not start with
        # identical experts), then the router of the first rank everywhere.
        self._seed = int(torch.randint(2 ** 62, (1,)).item()) + self.rank
        super().reset_parameters()
        self.broadcast_router()

    def _init_generator(self, p):
        return torch.Generator(p.device).manual_seed(self._seed)

    @torch.no_grad()
    def broadcast_router(self):
        """Copy the router (gate weight, expert_bias) of the group's first rank to all ranks."""
        if self.gate.weight.device.type == "meta" or self.world_size == 1:
            return
        src = dist.get_global_rank(self.process_group, 0)
        for t in (self.gate.weight, self.expert_bias):
            dist.broadcast(t.data, src=src, group=self.process_group)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        # The map is derived, not state: rebuilt where it now lives, it is right after
        # to_empty too (whose fresh int32 tensor holds no values).
        self.expert_map = local_expert_map(self.num_experts, self.first_expert,
                                           self.first_expert + self.num_local_experts,
                                           self.expert_bias.device)
        return result

    def extra_repr(self):
        return (f"{super().extra_repr()}, rank={self.rank}/{self.world_size}, "
                f"experts=[{self.first_expert}, {self.first_expert + self.num_local_experts}), "
                f"dispatch={self.dispatch}")

    def forward(self, hidden_states):
        try:  # a rank whose input fails the checks tells the others before raising
            x, weights, ids = self.route(hidden_states)
        except (TypeError, ValueError, IndexError) as exc:
            fail_together(exc, self.process_group, self.w1.device)
        shape = hidden_states.shape
        kw = dict(group_size=self.group_size, adjugate_scale=self.adjugate_scale,
                  process_group=self.process_group)
        if self.dispatch == "all_to_all":
            y, self.last_dispatch = dispatch_grove_experts(
                x, self.w1, self.w2, self.a1, self.a2, weights, ids, return_info=True, **kw)
        else:
            y = allreduce_grove_experts(x, self.w1, self.w2, self.a1, self.a2, weights, ids, **kw)
        return y.reshape(shape)

    @torch.no_grad()
    def reduce_router_grad(self):
        """Sum the router's gradient over the ranks (all_to_all style: each rank's gate weight
        saw only its own tokens). A no-op for the all_reduce style, whose router gradient is
        already complete on every rank. Divide by the world size for a DDP-like mean."""
        g = self.gate.weight.grad
        if self.dispatch == "all_to_all" and g is not None and self.world_size > 1:
            dist.all_reduce(g, group=self.process_group)

    def _sum_slot_counts(self, counts):
        # All_to_all style: each rank routed only its own tokens, so F is counted over the
        # group's; the bias then stays replicated. A collective: every rank must call
        # update_selection_bias.
        if self.dispatch == "all_to_all" and self.world_size > 1:
            dist.all_reduce(counts, group=self.process_group)
        return counts

    @classmethod
    def shard(cls, gate_weight, w1, w2, a1, a2, *, top_k, group_size=2, adjugate_scale=0.05,
              expert_bias=None, renormalize=True, process_group=None, dispatch="all_to_all",
              device=None, dtype=None):
        """The module of this rank from FULL checkpoint tensors: gate_weight [E, H], w1
        [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia], expert_bias [E] or None.
        Only this rank's slices are copied (to `device`/`dtype`, default those of w1); every
        rank passes the same tensors, so no collective is needed."""
        if not isinstance(gate_weight, torch.Tensor) or gate_weight.dim() != 2:
            raise ValueError("gate_weight: expected a 2-D tensor [E, H]")
        E, H = gate_weight.shape
        if not isinstance(w1, torch.Tensor) or w1.dim() != 3 or tuple(w1.shape[::2]) != (E, H):
            raise ValueError(f"w1: expected shape ({E}, 2I, {H}) (E, H of gate_weight), got "
                             f"{tuple(w1.shape) if isinstance(w1, torch.Tensor) else type(w1)}")
        if w1.shape[1] % 2 or not isinstance(a1, torch.Tensor) or a1.dim() != 3 or a1.shape[1] % 2:
            raise ValueError("w1, a1: expected even middle dimensions (2I, 2Ia)")
        if expert_bias is not None and tuple(expert_bias.shape) != (E,):
            raise ValueError(f"expert_bias: expected shape ({E},), got {tuple(expert_bias.shape)}")
        _, P, rank = resolve_group(process_group)
        parts = shard_experts(w1, w2, a1, a2, group_size=group_size, world_size=P, rank=rank)
        device = w1.device if device is None else device
        dtype = w1.dtype if dtype is None else dtype
        m = cls(H, w1.shape[1] // 2, E, top_k, group_size, a1.shape[1] // 2, adjugate_scale,
                renormalize=renormalize, process_group=process_group, dispatch=dispatch,
                device=device, dtype=dtype, _init=False)
        with torch.no_grad():
            m.gate.weight.copy_(gate_weight)
            for p, src in zip((m.w1, m.w2, m.a1, m.a2), parts):
                p.copy_(src)
            if expert_bias is not None:
                m.expert_bias.copy_(expert_bias)
        return m

    @classmethod
    def from_full(cls, layer, process_group=None, dispatch="all_to_all"):
        """The module of this rank from a full gk.GroveMoE (same weights on every rank)."""
        if not isinstance(layer, gk.GroveMoE):
            raise TypeError(f"layer: expected a grove_kernels.GroveMoE, got "
                            f"{type(layer).__name__}")
        return cls.shard(layer.gate.weight, layer.w1, layer.w2, layer.a1, layer.a2,
                         top_k=layer.top_k, group_size=layer.group_size,
                         adjugate_scale=layer.adjugate_scale, expert_bias=layer.expert_bias,
                         renormalize=layer.renormalize, process_group=process_group,
                         dispatch=dispatch)
