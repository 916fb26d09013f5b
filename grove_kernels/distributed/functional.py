"""Expert-parallel Grove MoE on torch.distributed: the functional forms.

P ranks, rank r holds the G/P consecutive groups [r·G/P, (r+1)·G/P), their E_l = S·G/P experts
[r·E_l, (r+1)·E_l) and their adjugates, so an adjugate is computed once per (token, group), by
the rank of its group (docs/design.md §1). Shape letters: T tokens of this rank, H hidden, k slots,
E = P·E_l global experts, N_s rows this rank sends, N_r rows it receives.

Token-once dispatch (`dispatch_grove_experts`; every rank routes its own tokens):

    topk_ids [T, k] (global) -> need [T, P]: token t has a slot on rank p
    counts   send_rows [P] --all_to_all--> recv_rows [P]; ONE host read of both (the split
             sizes of a variable-split all_to_all are host integers)
    dispatch x[send_tok] [N_s, H]            --all_to_all_single--> x_recv [N_r, H]
             (weights | ids) [N_s, 2k]       --all_to_all_single--> [N_r, 2k]  (ids bit-cast)
             rows ordered by destination rank, then token; each (token, rank) pair sent ONCE
             with its whole slot list: the receiver's expert_map masks the other ranks' slots
    compute  gk.fused_grove_experts(x_recv, local w1/w2/a1/a2, expert_map) -> y_part [N_r, H]
    combine  y_part --all_to_all_single--> y_back [N_s, H] (same order as sent)
             y_t = Σ_{p = 0..P-1} y_back[row of (t, p)], summed in rank order (fp32 or fp64
             accumulation), so the result does not depend on arrival order or atomics

Gradients flow through torch.distributed.nn.functional.all_to_all_single (its backward is the
reverse all_to_all) to x, the local weights and topk_weights (hence the router logits). They are
the gradients of Σ_r loss_r: a replicated parameter (the router) gets this rank's share and
needs a sum over ranks; the local experts get every rank's contribution through the collective.
Every rank must run the forward and the backward, also a rank with T = 0 (its experts serve
the others).

All-reduce style (`allreduce_grove_experts`): every rank holds the SAME tokens and routing, runs
its local experts on all of them (fused_grove_experts with expert_map) and an all-reduce sums
the partial outputs. Its gradients are those of one (replicated) loss: the all-reduce's backward
is the identity, and the partial d x / d topk_weights are all-reduced on the way back.

Host syncs per forward: the counts read above (the all_reduce style reads its small exchange
below the same way); gk's value checks add their own host reads unless switched off
(gk.set_value_checks(False)).

No rank is left waiting: before any payload collective every rank sends, with its counts
(the all_reduce style: in the same small exchange), its status and metadata [M] (dtypes of x
and topk_weights, H, k, E_l, S, λ, whether a backward will run, the style, T where tokens are
shared). Every rank then holds the same table and reaches the same verdict: a rank whose own
validation failed (its message follows in one all_gather), ranks that disagree (a ValueError
naming the argument and each rank's value), or ids out of range on some rank (IndexError);
every rank raises that same error, and the group stays usable.
"""
import struct
import warnings
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

import grove_kernels as gk
from grove_kernels import _validate
from grove_kernels import api as gk_api
from grove_kernels.routing import acc_dtype

# torch 2.13 deprecates torch.distributed.nn.functional in favour of _functional_collectives
# (a private module); the public API is the former. Silence its FutureWarning for calls made
# from this module only, so the user's own calls still warn.
warnings.filterwarnings("ignore", category=FutureWarning, module=__name__,
                        message=r"torch\.distributed\.nn\.functional\.")

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_STYLES = ("all_to_all", "all_reduce")
_ERROR_TYPES = (ValueError, TypeError, IndexError, RuntimeError)
_ERROR_BYTES = 2048


def _show_dtype(code):
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "a non-float dtype"


def _show_float(bits):
    return repr(struct.unpack("<d", struct.pack("<q", bits))[0])


# What each rank sends with its counts: (what must agree, how a value is shown).
_META = (
    ("hidden_states: dtype", _show_dtype),
    ("hidden_states: hidden size H", str),
    ("topk_weights: dtype", _show_dtype),
    ("topk_ids: slots per token k", str),
    ("w1: local experts E_l", str),
    ("group_size", str),
    ("adjugate_scale", _show_float),
    ("autograd: whether this call's backward runs (every rank must run it)",
     lambda v: str(bool(v))),
    ("dispatch style", lambda v: _STYLES[v] if 0 <= v < len(_STYLES) else str(v)),
    ("hidden_states: tokens T (the all_reduce style needs the same tokens on every rank)", str),
)


def _metadata(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size, adjugate_scale, style):
    code = lambda t: _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)  # noqa
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, w1, w2, a1, a2, topk_weights))
    scale = struct.unpack("<q", struct.pack("<d", float(adjugate_scale)))[0]
    return [code(x), x.shape[1], code(topk_weights), topk_ids.shape[1], w1.shape[0], group_size,
            scale, int(grad), _STYLES.index(style), x.shape[0] if style == "all_reduce" else 0]


def _device(group, *candidates):
    """Where this rank's small exchange tensors live: that of its inputs, else the group's."""
    for t in candidates:
        if isinstance(t, torch.Tensor):
            return t.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_together(group, P, device, error, failed):
    """Every rank raises the error of the first failed rank (its type and message travel in
    one all_gather)."""
    buf = torch.zeros(_ERROR_BYTES, dtype=torch.uint8, device=device)
    if error is not None:
        kind = next((i for i, t in enumerate(_ERROR_TYPES) if isinstance(error, t)),
                    len(_ERROR_TYPES) - 1)
        text = str(error).encode()[: _ERROR_BYTES - 1]
        buf[0] = kind
        buf[1:1 + len(text)] = torch.tensor(list(text), dtype=torch.uint8, device=device)
    bufs = [torch.empty_like(buf) for _ in range(P)]
    dist.all_gather(bufs, buf, group=group)
    first = bufs[failed[0]].cpu()
    text = bytes(first[1:].tolist()).rstrip(b"\0").decode(errors="replace")
    others = "" if len(failed) == 1 else f"; ranks {failed} failed their checks"
    exc = _ERROR_TYPES[int(first[0])](f"{text} (rank {failed[0]} of the process group{others}; "
                                      f"every rank raises this error)")
    raise exc from error


def _disagreement(metas, ranks):
    """The message naming what the ranks disagree on, or None."""
    for i, (what, show) in enumerate(_META):
        values = [m[i] for m in metas]
        if len(set(values)) > 1:
            by_value = {}
            for r, v in zip(ranks, values):
                by_value.setdefault(v, []).append(r)
            got = ", ".join(f"{show(v)} on rank(s) {rs}" for v, rs in by_value.items())
            return f"{what}: every rank of the process group must pass the same, got {got}"
    return None


def _exchange(group, P, device, send_rows, bad, meta, error=None):
    """The counts exchange: (send splits, recv splits) as host lists, after every rank has
    checked the same table of statuses and metadata (see the module docstring); raises the same
    error on every rank otherwise."""
    M = len(_META)
    if error is not None:
        send_rows = torch.zeros(P, dtype=torch.int64, device=device)
        bad, meta = torch.zeros((), dtype=torch.bool, device=device), [0] * M
    # Built on the host and copied without a stream sync: the counts read below stays the
    # forward's one host sync.
    row = torch.tensor([int(error is not None)] + meta, dtype=torch.int64).to(
        device, non_blocking=True)
    msg = torch.cat([send_rows.to(torch.int64).view(P, 1),
                     bad.to(torch.int64).expand(P).view(P, 1), row.expand(P, M + 1)], dim=1)
    got = torch.empty_like(msg)
    dist.all_to_all_single(got, msg, group=group)
    # The one host sync: all_to_all_single takes its split sizes as Python integers.
    host = torch.cat([send_rows.to(torch.int64), got.reshape(-1)]).tolist()
    W = M + 3
    table = [host[P + p * W: P + (p + 1) * W] for p in range(P)]
    failed = [p for p in range(P) if table[p][2]]
    if failed:
        _raise_together(group, P, device, error, failed)
    mismatch = _disagreement([r[3:] for r in table], list(range(P)))
    if mismatch:
        raise ValueError(mismatch)
    bad_ranks = [p for p in range(P) if table[p][1]]
    if bad_ranks:
        raise IndexError(f"topk_ids: values must lie in [0, E) (global experts); rank(s) "
                         f"{bad_ranks} of the group passed ids outside")
    return host[:P], [r[0] for r in table]


def fail_together(error, process_group=None, device=None):
    """Raise `error` (this rank's own check failed before the dispatch) on every rank of the
    group: the others are in, or about to enter, the counts exchange of the same call."""
    group, P, _ = resolve_group(process_group)
    _exchange(group, P, device or _device(group), None, None, None, error)


@dataclass
class DispatchInfo:
    """Rows one token-once dispatch moved, from the split sizes given to all_to_all_single.

    send_rows[p]: rows this rank sent to rank p (its own entry is a local copy); recv_rows[p]:
    rows it received from p. The combine moves the same rows back, x_row_bytes each.
    """
    rank: int
    tokens: int  # T of this rank
    send_rows: List[int]
    recv_rows: List[int]
    x_row_bytes: int  # H · element size of x
    meta_row_bytes: int  # 2k · element size of topk_weights (weights + bit-cast ids)

    @property
    def remote_rows_sent(self):
        return sum(self.send_rows) - self.send_rows[self.rank]

    @property
    def remote_rows_received(self):
        return sum(self.recv_rows) - self.recv_rows[self.rank]

    @property
    def dispatch_x_bytes(self):  # sent to other ranks
        return self.remote_rows_sent * self.x_row_bytes

    @property
    def dispatch_meta_bytes(self):
        return self.remote_rows_sent * self.meta_row_bytes

    @property
    def combine_bytes(self):  # partial outputs sent back to other ranks
        return self.remote_rows_received * self.x_row_bytes


def resolve_group(process_group):
    """(group, world size P, rank r) of `process_group` (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def local_expert_range(num_experts, group_size, world_size, rank):
    """(first, last + 1) global expert of `rank`: whole groups, G/P consecutive ones per rank."""
    for name, value in (("num_experts", num_experts), ("group_size", group_size),
                        ("world_size", world_size)):
        _validate.positive_int(name, value)
    if num_experts % group_size:
        raise ValueError(f"group_size: must divide num_experts={num_experts}, got {group_size}")
    G = num_experts // group_size
    if G % world_size:
        raise ValueError(f"world_size: the {G} groups (num_experts={num_experts} / "
                         f"group_size={group_size}) must be divisible by the world size "
                         f"{world_size}: groups are sharded whole, G/P per rank")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected in [0, {world_size}), got {rank}")
    per_rank = num_experts // world_size
    return rank * per_rank, (rank + 1) * per_rank


def local_expert_map(num_experts, first, last, device=None):
    """vLLM expert_map [E] int32: global id -> local index for [first, last), -1 elsewhere."""
    m = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    m[first:last] = torch.arange(last - first, dtype=torch.int32, device=device)
    return m


def _check_call(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size, adjugate_scale, P):
    """Every metadata check of this rank's call, the local experts call's included (ids
    arrive from the other ranks, so those checks must pass before the exchange); returns
    (T, H, E_l, k)."""
    gk_api._check_weights(x, w1, w2)  # first: it names the argument at fault in H mismatches
    T, H, E_l, k = _check(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size)
    gk_api._check_adjugates(x, a1, a2, E_l, group_size, adjugate_scale)
    gk_api._check_routing(x, topk_weights, topk_ids, E_l * P)
    if topk_weights.element_size() == 2 and E_l * P > torch.iinfo(torch.int16).max:
        raise ValueError(f"topk_weights: 16-bit weights carry the ids as int16, which cannot "
                         f"hold {E_l * P} experts; pass fp32 weights")
    return T, H, E_l, k


def _checked(group, P, style, x, w1, w2, a1, a2, topk_weights, topk_ids, group_size,
             adjugate_scale):
    """(T, H, E_l, k, metadata) of this call, or, when a check fails, that error raised on
    every rank of the group (the others would wait in the exchange)."""
    try:
        T, H, E_l, k = _check_call(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size,
                                   adjugate_scale, P)
    except (TypeError, ValueError, IndexError) as exc:
        fail_together(exc, group, _device(group, x))
    meta = _metadata(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size, adjugate_scale,
                     style)
    return T, H, E_l, k, meta


def _check(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size):
    """Metadata checks before any collective (a rank that raises later leaves the others
    waiting); returns (T, H, E_l, k)."""
    for name, t, ndim in (("hidden_states", x, 2), ("w1", w1, 3), ("w2", w2, 3), ("a1", a1, 3),
                          ("a2", a2, 3), ("topk_weights", topk_weights, 2),
                          ("topk_ids", topk_ids, 2)):
        _validate.tensor(name, t, ndim)
    _validate.same_device("hidden_states", x, w1=w1, w2=w2, a1=a1, a2=a2,
                          topk_weights=topk_weights, topk_ids=topk_ids)
    _validate.same_dtype("hidden_states", x, w1=w1, w2=w2, a1=a1, a2=a2)
    if w1.shape[2] != x.shape[1] or a1.shape[2] != x.shape[1]:
        raise ValueError(f"w1, a1: expected [.., .., H={x.shape[1]}] (H of hidden_states), got "
                         f"{tuple(w1.shape)} and {tuple(a1.shape)}")
    _validate.tensor("topk_ids", topk_ids, 2, _validate.INDEX_DTYPES)
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights: expected a floating dtype, got {topk_weights.dtype}")
    T, H = x.shape
    if tuple(topk_weights.shape) != (T, topk_ids.shape[1]) or topk_ids.shape[0] != T:
        raise ValueError(f"topk_weights, topk_ids: expected shape ({T}, k) each (T of "
                         f"hidden_states), got {tuple(topk_weights.shape)} and "
                         f"{tuple(topk_ids.shape)}")
    E_l = w1.shape[0]
    _validate.positive_int("group_size", group_size)
    if E_l % group_size or a1.shape[0] != E_l // group_size:
        raise ValueError(f"w1, a1: a rank holds whole groups: expected E_l = group_size · G_l "
                         f"local experts, got w1 {tuple(w1.shape)}, a1 {tuple(a1.shape)}, "
                         f"group_size={group_size}")
    return T, H, E_l, topk_ids.shape[1]


def _pack_meta(weights, ids):
    """[N, 2k]: the weights, then the ids bit-cast to the weights' dtype (one collective)."""
    int_dtype = _INT_OF_SIZE[weights.element_size()]
    return torch.cat([weights, ids.to(int_dtype).view(weights.dtype)], dim=1)


def _unpack_meta(meta, k):
    int_dtype = _INT_OF_SIZE[meta.element_size()]
    ids = meta[:, k:].detach().contiguous().view(int_dtype).to(torch.int32)
    return meta[:, :k], ids


def dispatch_grove_experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, *,
                           group_size=2, adjugate_scale=0.05, process_group=None,
                           return_info=False):
    """Grove experts + adjugates with experts sharded over the ranks; token-once dispatch.

    hidden_states [T, H] and the routing topk_weights / topk_ids [T, k] (GLOBAL expert ids) are
    this rank's tokens; w1 [E_l, 2I, H], w2 [E_l, H, I], a1 [G_l, 2Ia, H], a2 [G_l, H, Ia] are
    this rank's shard (experts [r·E_l, (r+1)·E_l), E_l = S·G_l). Returns y [T, H], equal to
    gk.fused_grove_experts on the full weights; with return_info, (y, DispatchInfo).
    """
    group, P, rank = resolve_group(process_group)
    x = hidden_states
    T, H, E_l, k, meta = _checked(group, P, "all_to_all", x, w1, w2, a1, a2, topk_weights,
                                  topk_ids, group_size, adjugate_scale)
    E = E_l * P
    ids = topk_ids.long()
    dest = torch.div(ids, E_l, rounding_mode="floor")  # [T, k]: the rank of each slot
    need = (dest[:, :, None] == torch.arange(P, device=ids.device)).any(1)  # [T, P]
    send_rows = need.sum(0)
    bad = ((ids < 0) | (ids >= E)).any()
    send, recv = _exchange(group, P, x.device, send_rows, bad, meta)

    n_send, n_recv = sum(send), sum(recv)
    # (p, t) pairs in row-major order of need^T: by destination rank, then token. The size is
    # known from the counts, so nonzero_static needs no second host read.
    flat = torch.nonzero_static(need.t().reshape(-1), size=n_send).squeeze(1)
    send_tok = flat % max(T, 1)
    x_send = x[send_tok]
    meta_send = _pack_meta(topk_weights[send_tok], topk_ids[send_tok])
    x_recv = dist_fn.all_to_all_single(x.new_empty(n_recv, H), x_send.contiguous(), recv, send,
                                       group=group)
    meta_recv = dist_fn.all_to_all_single(meta_send.new_empty(n_recv, 2 * k), meta_send, recv,
                                          send, group=group)
    w_recv, ids_recv = _unpack_meta(meta_recv, k)

    expert_map = local_expert_map(E, rank * E_l, (rank + 1) * E_l, device=x.device)
    y_part = gk.fused_grove_experts(x_recv, w1, w2, a1, a2, w_recv, ids_recv,
                                    group_size=group_size, adjugate_scale=adjugate_scale,
                                    expert_map=expert_map)
    y_back = dist_fn.all_to_all_single(y_part.new_empty(n_send, H), y_part.contiguous(), send,
                                       recv, group=group)

    acc = acc_dtype(x.dtype)
    y = y_back.new_zeros(T, H, dtype=acc)
    start = 0
    for p in range(P):
        # Each token appears at most once per source rank, so an accumulating index_put has
        # no duplicate index (no race); ranks are added one after another, in rank order.
        # Called for empty segments too: y must stay in the graph even when T = 0, or this
        # rank would skip the combine's backward all_to_all that the other ranks wait in.
        # (index_put, not index_add: the latter takes ~0.1 s per call on a multi-threaded CPU.)
        rows = slice(start, start + send[p])
        y = y.index_put((send_tok[rows],), y_back[rows].to(acc), accumulate=True)
        start += send[p]
    y = y.to(x.dtype)
    if not return_info:
        return y
    info = DispatchInfo(rank=rank, tokens=T, send_rows=send, recv_rows=recv,
                        x_row_bytes=H * x.element_size(),
                        meta_row_bytes=2 * k * topk_weights.element_size())
    return y, info


class _CopyToRanks(torch.autograd.Function):
    """Identity forward; the backward sums the ranks' partial gradients (all-reduce)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: the output is replicated, and so is the
    gradient that reaches it."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def allreduce_grove_experts(hidden_states, w1, w2, a1, a2, topk_weights, topk_ids, *,
                            group_size=2, adjugate_scale=0.05, process_group=None):
    """The all-reduce expert-parallel style: the SAME hidden_states [T, H] and routing on every
    rank; each rank computes its local experts and adjugates (fused_grove_experts with
    expert_map) and an all-reduce sums the partial outputs -> y [T, H], replicated.

    Gradients are those of one loss computed identically on every rank: the local weights get
    exactly their gradient, d hidden_states and d topk_weights are complete on every rank.
    """
    group, P, rank = resolve_group(process_group)
    _, _, E_l, _, meta = _checked(group, P, "all_reduce", hidden_states, w1, w2, a1, a2,
                                  topk_weights, topk_ids, group_size, adjugate_scale)
    # The same small exchange as the all_to_all style's counts (no rows move here): a rank
    # that disagrees would otherwise meet the others in an all_reduce of another size.
    _exchange(group, P, hidden_states.device,
              torch.zeros(P, dtype=torch.int64, device=hidden_states.device),
              torch.zeros((), dtype=torch.bool, device=hidden_states.device), meta)
    E = E_l * P
    expert_map = local_expert_map(E, rank * E_l, (rank + 1) * E_l, device=hidden_states.device)
    x = _CopyToRanks.apply(hidden_states, group)
    w = _CopyToRanks.apply(topk_weights, group)
    y_part = gk.fused_grove_experts(x, w1, w2, a1, a2, w, topk_ids, group_size=group_size,
                                    adjugate_scale=adjugate_scale, expert_map=expert_map)
    return _SumOverRanks.apply(y_part, group)


DISPATCH_STYLES = ("all_to_all", "all_reduce")


def expert_parallel_grove_moe(hidden_states, router_logits, w1, w2, a1, a2, *, top_k,
                              group_size=2, adjugate_scale=0.05, renormalize=True,
                              selection_bias=None, process_group=None, dispatch="all_to_all"):
    """gk.grove_moe with the experts sharded over the ranks: routing (replicated router, this
    rank's tokens) then `dispatch_grove_experts` ("all_to_all") or `allreduce_grove_experts`
    ("all_reduce"). router_logits [T, E] cover the GLOBAL experts; w1..a2 are the local shard.
    Differentiable in hidden_states, the router logits and the local weights."""
    if dispatch not in DISPATCH_STYLES:
        raise ValueError(f"dispatch: expected one of {DISPATCH_STYLES}, got {dispatch!r}")
    group, P, _ = resolve_group(process_group)
    try:  # a rank whose routing fails its checks tells the others before raising
        if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
            raise ValueError("router_logits: expected a 2-D tensor [T, E]")
        if not isinstance(w1, torch.Tensor) or w1.dim() != 3:
            raise ValueError("w1: expected a 3-D tensor [E_l, 2I, H]")
        if router_logits.shape[1] != w1.shape[0] * P:
            raise ValueError(f"router_logits: expected {w1.shape[0] * P} columns (the global "
                             f"experts: {w1.shape[0]} local experts of w1 x world size {P}), "
                             f"got shape {tuple(router_logits.shape)}")
        weights, ids = gk.grove_topk(router_logits, top_k, renormalize=renormalize,
                                     selection_bias=selection_bias)
    except (TypeError, ValueError, IndexError) as exc:
        fail_together(exc, group, _device(group, hidden_states, router_logits))
    fn = dispatch_grove_experts if dispatch == "all_to_all" else allreduce_grove_experts
    return fn(hidden_states, w1, w2, a1, a2, weights, ids, group_size=group_size,
              adjugate_scale=adjugate_scale, process_group=process_group)
