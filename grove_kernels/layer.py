"""`GroveMoE`: the Grove MoE block as an nn.Module with packed weights (`GroveBlock` holds what
it shares with the expert-parallel module: sizes, router, weights, the selection-bias update).

    x [..., H] -> gate -> logits [T, E] -> grove_topk(+ expert_bias) -> w, ids [T, k]
               -> fused_grove_experts(x, w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia])
               -> y [..., H]

`expert_bias` is a buffer (auxiliary-loss-free balancing): it steers selection only and is
updated outside autograd by `update_selection_bias`; it stays fp32 through dtype conversions.
Deferred init: `GroveMoE(..., device="meta").to_empty(device=d)`, then `reset_parameters()` or
a weight load.
"""
import math

import torch
from torch import nn

from . import _validate, api


def _stack(name, tensors, shape):
    if isinstance(tensors, torch.Tensor):
        stacked = tensors
    else:
        tensors = list(tensors)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(f"{name}: expected a tensor or a non-empty sequence of tensors")
        if any(tuple(t.shape) != tuple(shape[1:]) for t in tensors):
            bad = next(t for t in tensors if tuple(t.shape) != tuple(shape[1:]))
            raise ValueError(f"{name}: expected per-expert shape {tuple(shape[1:])}, got "
                             f"{tuple(bad.shape)}")
        stacked = torch.stack(tensors)
    if tuple(stacked.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(stacked.shape)}")
    return stacked


class GroveBlock(nn.Module):
    """What every Grove MoE module shares: the sizes, the replicated router (gate, fp32
    expert_bias), the packed weights of the experts and adjugates it holds (w1 [E_l, 2I, H],
    w2 [E_l, H, I], a1 [G_l, 2Ia, H], a2 [G_l, H, Ia]; all E experts and G groups in GroveMoE,
    one rank's shard in ExpertParallelGroveMoE), routing, and the selection-bias update."""

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, group_size,
                 adjugate_intermediate_size, adjugate_scale, renormalize, local_experts,
                 device, dtype):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts), ("group_size", group_size),
                            ("adjugate_intermediate_size", adjugate_intermediate_size)):
            _validate.positive_int(name, value)
        _validate.positive_int("top_k", top_k, num_experts, "num_experts")
        if num_experts % group_size:
            raise ValueError(f"group_size: must divide num_experts={num_experts}, got {group_size}")
        self.hidden_size = H = hidden_size
        self.intermediate_size = I = intermediate_size
        self.num_experts = E = num_experts
        self.top_k = top_k
        self.group_size = group_size
        self.num_groups = E // group_size
        self.adjugate_intermediate_size = Ia = adjugate_intermediate_size
        self.adjugate_scale = float(adjugate_scale)
        self.renormalize = renormalize
        kw = dict(device=device, dtype=dtype)
        G_l = local_experts // group_size
        self.gate = nn.Linear(H, E, bias=False, **kw)
        self.w1 = nn.Parameter(torch.empty(local_experts, 2 * I, H, **kw))
        self.w2 = nn.Parameter(torch.empty(local_experts, H, I, **kw))
        self.a1 = nn.Parameter(torch.empty(G_l, 2 * Ia, H, **kw))
        self.a2 = nn.Parameter(torch.empty(G_l, H, Ia, **kw))
        self.register_buffer("expert_bias", torch.zeros(E, device=device, dtype=torch.float32))
        self.last_topk_ids = None

    def _apply(self, fn, *args, **kwargs):
        # .to(bf16) must not round the selection bias: its 1e-3 updates would vanish.
        bias = self.expert_bias
        result = super()._apply(fn, *args, **kwargs)
        new = self.expert_bias
        if new.dtype != torch.float32:
            # A meta bias has no values to keep (and cannot be copied out of): any will do.
            new = new.float() if bias.is_meta else bias.to(device=new.device)
        self.expert_bias = new
        return result

    def reset_parameters(self):
        """nn.Linear's default init per expert, U(±1/sqrt(fan_in)), the router's own, a zero
        bias. Parameters on the meta device have no values to set."""
        for p in (self.w1, self.w2, self.a1, self.a2):
            if p.device.type == "meta":
                continue
            bound = 1.0 / math.sqrt(p.shape[-1])
            with torch.no_grad():
                p.uniform_(-bound, bound, generator=self._init_generator(p))
        self.gate.reset_parameters()
        self.expert_bias.zero_()

    def _init_generator(self, p):
        """The random stream of p's init: torch's default one."""
        return None

    def extra_repr(self):
        return (f"H={self.hidden_size}, I={self.intermediate_size}, E={self.num_experts}, "
                f"k={self.top_k}, S={self.group_size}, Ia={self.adjugate_intermediate_size}, "
                f"adjugate_scale={self.adjugate_scale}")

    def route(self, hidden_states):
        """x [T, H], routing weights and ids [T, k] of hidden_states [..., H]; a training
        module keeps the ids for update_selection_bias."""
        _validate.tensor("hidden_states", hidden_states)
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states: expected last dimension {self.hidden_size}, got "
                             f"shape {tuple(hidden_states.shape)}")
        if hidden_states.dtype != self.w1.dtype:
            # Caught here, the error names the argument (the gate's matmul would not).
            raise TypeError(f"hidden_states: expected dtype {self.w1.dtype} (that of the "
                            f"module's weights), got {hidden_states.dtype}")
        x = hidden_states.reshape(-1, self.hidden_size)
        weights, ids = api.grove_topk(self.gate(x), self.top_k, renormalize=self.renormalize,
                                      selection_bias=self.expert_bias)
        if self.training:
            self.last_topk_ids = ids.detach()
        return x, weights, ids

    def _sum_slot_counts(self, counts):
        """The slot counts [E + 2] (per expert, out of range, in range) of every token the
        bias is balanced over; here this module's own."""
        return counts

    @torch.no_grad()
    def update_selection_bias(self, topk_ids, lr=1e-3):
        """Auxiliary-loss-free balancing step: b <- b - lr · (F - Q) / ||F - Q||_2.

        F is the fraction of token slots each expert received in `topk_ids`, Q = 1/E. Ids
        outside [0, E) raise IndexError (with the value checks off they are left out of F).
        """
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32,
                                                                             torch.int64):
            raise TypeError("topk_ids: expected an int32/int64 tensor")
        E = self.num_experts
        ids = topk_ids.reshape(-1).long().to(self.expert_bias.device)
        ok = (ids >= 0) & (ids < E)
        # int64 counts: exact (fp32 would round beyond 2^24 slots summed over ranks) and
        # deterministic on every device. Out-of-range ids are counted apart, in slot E, so
        # that every rank of a collective update learns of them and all raise alike instead
        # of one leaving the others waiting in the all-reduce.
        counts = torch.cat([torch.bincount(torch.where(ok, ids, E), minlength=E + 1),
                            ok.sum().view(1)])
        counts = self._sum_slot_counts(counts)
        _validate.none_out_of_range("topk_ids", counts[E], 0, E)
        counts = counts.double()
        n = counts[-1]
        delta = counts[:E] / n.clamp_min(1) - 1.0 / E
        norm = delta.norm()
        # No slot, or perfect balance, leaves the bias alone instead of dividing by zero.
        step = torch.where((norm > 0) & (n > 0), delta / norm.clamp_min(1e-30), 0.0)
        self.expert_bias -= (lr * step).to(self.expert_bias.dtype)


class GroveMoE(GroveBlock):
    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, group_size=2,
                 adjugate_intermediate_size=128, adjugate_scale=0.05, *, renormalize=True,
                 device=None, dtype=None):
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, group_size,
                         adjugate_intermediate_size, adjugate_scale, renormalize,
                         local_experts=num_experts, device=device, dtype=dtype)
        self.reset_parameters()

    def forward(self, hidden_states):
        x, weights, ids = self.route(hidden_states)
        y = api.fused_grove_experts(x, self.w1, self.w2, self.a1, self.a2, weights, ids,
                                    group_size=self.group_size,
                                    adjugate_scale=self.adjugate_scale)
        return y.reshape(hidden_states.shape)

    @torch.no_grad()
    def load_expert_weights(self, gate_proj, up_proj, down_proj, adj_gate_proj, adj_up_proj,
                            adj_down_proj):
        """Pack per-expert weights (released checkpoint layout, nn.Linear [out, in]).

        gate/up [E, I, H], down [E, H, I]; adj_gate/adj_up [G, Ia, H], adj_down [G, H, Ia];
        each a stacked tensor or a sequence of per-expert tensors.
        """
        E, I, H = self.num_experts, self.intermediate_size, self.hidden_size
        G, Ia = self.num_groups, self.adjugate_intermediate_size
        self.w1[:, :I].copy_(_stack("gate_proj", gate_proj, (E, I, H)))
        self.w1[:, I:].copy_(_stack("up_proj", up_proj, (E, I, H)))
        self.w2.copy_(_stack("down_proj", down_proj, (E, H, I)))
        self.a1[:, :Ia].copy_(_stack("adj_gate_proj", adj_gate_proj, (G, Ia, H)))
        self.a1[:, Ia:].copy_(_stack("adj_up_proj", adj_up_proj, (G, Ia, H)))
        self.a2.copy_(_stack("adj_down_proj", adj_down_proj, (G, H, Ia)))
