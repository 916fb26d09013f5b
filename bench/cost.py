"""The FLOP / byte model of one Grove (or plain MoE) layer call, and the roofline floor.

Inputs: topk_ids [T, k] (any integer dtype, any device; read once on the host), the preset's
H, E, k, I, S, Ia, the element size of the run's dtype.

FLOPs ("useful": what the layer needs, never what a scheme happens to compute):
    experts    2 · k · 3 · H · I  per token   (GEMM-1 is 2I x H, GEMM-2 is H x I: 3·H·I MACs)
    adjugates  2 · d_t · 3 · H · Ia per token, d_t = distinct groups (ids // S) of token t
  The two-call scheme computes Σ_t k · 3 · H · Ia adjugate MACs: the excess over d_t is waste
  and is deliberately not counted, so its TFLOP/s is directly comparable to the fused layer.
  Router softmax / top-k, SwiGLU and the combine are O(T·(E + k·I + k·H)) and left out.

Bytes (forward): every weight matrix that at least one token reads, once
    experts with ≥ 1 token  × 3·H·I elements,  groups with ≥ 1 token × 3·H·Ia elements,
  plus the activations x [T, H] in and y [T, H] out. Routing tensors (T·k·8 bytes) and the
  intermediates [T·k, 2I] are left out: a fused kernel keeps the latter on chip, and the
  floor is a lower bound.

Forward + backward (the loss is ⟨y, g⟩ for a fixed g [T, H]; grads for x, every weight and
topk_weights): FLOPs = 3 × forward (dX and dW each cost one forward's worth of GEMMs).
Bytes = 3 × touched weights (read in forward, read again for dX, dW written once) +
5 × T·H activations (x, y in forward; g and x read, dX written in backward); the
per-row weight gradient [T, k] is again ignored.

floor_us = max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the same run;
pct_floor = 100 · floor_us / us, i.e. 100 means the call runs at the floor.
"""
from dataclasses import dataclass

import torch

PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    distinct_groups: float  # mean d_t over the T tokens (0 when T = 0)
    experts_touched: int
    groups_touched: int


def distinct_groups_per_token(topk_ids, group_size):
    """d_t [T] int64: the number of distinct groups ids // S in each row of topk_ids [T, k]."""
    groups = torch.sort(topk_ids.detach().cpu().long() // group_size, dim=1).values
    if groups.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    return 1 + (groups.diff(dim=1) != 0).sum(dim=1)


def layer_cost(topk_ids, preset, *, adjugates, pass_, elem_bytes):
    """Cost of one call at routing topk_ids [T, k] for the Grove layer (adjugates=True) or
    the plain MoE layer (adjugates=False), pass_ "fwd" or "fwd+bwd"."""
    if pass_ not in PASSES:
        raise ValueError(f"pass: expected one of {PASSES}, got {pass_!r}")
    ids = topk_ids.detach().cpu().long()
    T, k = ids.shape
    H, I, Ia, S = preset.hidden, preset.intermediate, preset.adj_intermediate, preset.group_size
    d = distinct_groups_per_token(ids, S)
    experts_touched = int(torch.unique(ids).numel())
    groups_touched = int(torch.unique(ids // S).numel())

    flops = 2.0 * T * k * 3 * H * I
    weight_elems = experts_touched * 3.0 * H * I
    if adjugates:
        flops += 2.0 * float(d.sum()) * 3 * H * Ia
        weight_elems += groups_touched * 3.0 * H * Ia
    act_elems = 1.0 * T * H
    if pass_ == "fwd":
        nbytes = (weight_elems + 2 * act_elems) * elem_bytes
    else:
        flops *= 3
        nbytes = (3 * weight_elems + 5 * act_elems) * elem_bytes
    return Cost(
        flops=flops,
        bytes=nbytes,
        distinct_groups=float(d.double().mean()) if T else 0.0,
        experts_touched=experts_touched,
        groups_touched=groups_touched if adjugates else 0,
    )


def floor_us(cost, copy_gbps, matmul_tflops):
    """The roofline floor in µs: max(memory time, compute time) at the measured ceilings."""
    return max(cost.bytes / (copy_gbps * 1e3), cost.flops / (matmul_tflops * 1e6))


def row_metrics(cost, us, copy_gbps, matmul_tflops):
    """us -> the per-row rates of docs/design.md §6 (all floats)."""
    floor = floor_us(cost, copy_gbps, matmul_tflops)
    return {
        "us": us,
        "tflops": cost.flops / (us * 1e6),
        "gbps": cost.bytes / (us * 1e3),
        "floor_us": floor,
        "pct_floor": 100.0 * floor / us,
        "distinct_groups": cost.distinct_groups,
    }
