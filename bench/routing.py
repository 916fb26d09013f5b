"""Router-logit generators for the three routing modes of docs/design.md §6, and the routing call.

    make_logits(mode, T, preset) -> logits [T, E] fp32 (CPU, seeded: identical on every device)
    route(logits, preset, device) -> topk_weights [T, k] fp32, topk_ids [T, k] int32 (gk.grove_topk)

Modes:
  uniform   l ~ N(0, 1): d_t ≈ k·(1 − small) distinct groups (≈ 7.78 of 8 at grove-33b).
  coactive  one N(0, 3²) logit per group, shared by its S experts plus N(0, 0.01²) jitter:
            sigmoid keeps the order, so top-k takes whole groups and d_t ≈ ceil(k / S).
            The jitter keeps the softmax weights distinct so the sum of w per group matters.
  skewed    Zipf-like expert popularity p_e ∝ 1 / rank_e^s over a seeded permutation of the
            experts; l = log p_e + Gumbel noise, so top-k of l (and of sigmoid(l)) samples k
            experts without replacement with probability ∝ p_e (the Gumbel-top-k trick).
Routing is computed once per (mode, T), outside every timed region.
"""
import math

import torch

import grove_kernels as gk

MODES = ("uniform", "coactive", "skewed")
ZIPF_EXPONENT = 1.2  # s: the hottest expert gets ~1/4 of the selection mass at E = 128
COACTIVE_GROUP_STD = 3.0
COACTIVE_JITTER = 0.01


def make_logits(mode, num_tokens, preset, seed=0):
    """Seeded router logits [T, E] fp32 on the CPU for routing mode `mode`."""
    E, S = preset.experts, preset.group_size
    # One generator per (mode, T) so adding a T or a mode never changes the other rows.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + num_tokens * 31 + MODES.index(mode))
    if mode == "uniform":
        return torch.randn(num_tokens, E, generator=gen)
    if mode == "coactive":
        group = torch.randn(num_tokens, E // S, generator=gen) * COACTIVE_GROUP_STD
        jitter = torch.randn(num_tokens, E, generator=gen) * COACTIVE_JITTER
        return group.repeat_interleave(S, dim=1) + jitter
    if mode == "skewed":
        rank = torch.randperm(E, generator=gen).double() + 1.0
        log_p = -ZIPF_EXPONENT * torch.log(rank)
        log_p -= torch.logsumexp(log_p, 0)
        u = torch.rand(num_tokens, E, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(u))
        return (log_p + gumbel).float()
    raise ValueError(f"routing: unknown mode {mode!r}; known: {MODES}")


def route(logits, preset, device):
    """(topk_weights [T, k] fp32, topk_ids [T, k] int32) on `device`, by gk.grove_topk."""
    w, ids = gk.grove_topk(logits.to(device), preset.top_k)
    return w.detach(), ids


def expected_uniform_distinct(preset):
    """E[d_t] for k experts drawn uniformly without replacement: G·(1 − C(E−S, k)/C(E, k)).

    Used only to label reports; the benchmark always reports the measured d."""
    E, S, k = preset.experts, preset.group_size, preset.top_k
    if k > E - S:
        return float(min(k, preset.groups))
    return preset.groups * (1.0 - math.comb(E - S, k) / math.comb(E, k))
