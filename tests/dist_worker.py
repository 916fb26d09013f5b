"""Worker side of tests/test_distributed.py: one process per rank, every case in one start.

    run(rank, P, port, out_dir)            -> out_dir/rank{r}.json: {case: {metric: value}}
    run_nccl_smoke(rank, P, port, out_dir) -> out_dir/rank{r}.json: {"nccl": {...}} (GPU)

Each case builds the same full fp64 gk.GroveMoE on every rank (seeded), runs the expert-parallel
layer on this rank's tokens (or on all tokens for the all_reduce style), and compares with the
single-process layer on the whole batch: forward rows of this rank, d x, the local shard's
gradients, the router's (summed over ranks). Metrics are relative errors ||out - ref|| / ||ref||
(absolute where ref is zero); the test file asserts them. A case that raises writes
rank{r}.error (time, traceback) and takes the group down; the test shows those tracebacks.
"""
import json
import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import grove_kernels as gk
from grove_kernels import distributed as gkd

F64 = torch.float64


def rel_err(out, ref):
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert o.shape == r.shape, (tuple(o.shape), tuple(r.shape))
    if not torch.isfinite(o).all():
        return float("inf")
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 1e-12 else num


def _rand(*shape, gen, dtype=F64, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=F64).to(device=device, dtype=dtype)


def full_layer(seed, H=16, I=8, E=8, k=2, S=2, Ia=4, bias=None, dtype=F64, device="cpu"):
    """The single-process layer, identical on every rank (seeded; O(1) outputs)."""
    gen = torch.Generator().manual_seed(seed)
    layer = gk.GroveMoE(H, I, E, k, S, Ia, 0.05, dtype=dtype, device=device)
    with torch.no_grad():
        for p in (layer.w1, layer.w2, layer.a1, layer.a2, layer.gate.weight):
            p.copy_(_rand(*p.shape, gen=gen, dtype=dtype, device=device) * p.shape[-1] ** -0.5)
        if bias is not None:
            layer.expert_bias.copy_(bias)
    return layer


def _batch(seed, counts, H, dtype=F64, device="cpu"):
    """x [ΣT, H] and a cotangent g [ΣT, H] for all ranks' tokens; rank r owns rows
    [Σ counts[:r], Σ counts[:r+1])."""
    gen = torch.Generator().manual_seed(seed + 1)
    n = sum(counts)
    return _rand(n, H, gen=gen, dtype=dtype, device=device), _rand(n, H, gen=gen, dtype=dtype,
                                                                   device=device)


def _rows(counts, rank):
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def _reference(layer, x, g):
    """Forward, d x, d gate and d weights of the single-process layer on the whole batch."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _compare(ep, y, x_grad, ref, rows):
    y_ref, dx_ref, grads = ref
    first, E_l, G_l = ep.first_expert, ep.num_local_experts, ep.num_local_groups
    g0 = first // ep.group_size
    out = {"y": rel_err(y, y_ref[rows]), "dx": rel_err(x_grad, dx_ref[rows]),
           "gate": rel_err(ep.gate.weight.grad, grads["gate.weight"])}
    for name, lo, n in (("w1", first, E_l), ("w2", first, E_l), ("a1", g0, G_l), ("a2", g0, G_l)):
        out[name] = rel_err(getattr(ep, name).grad, grads[name][lo:lo + n])
    return out


def case_module(P, rank, *, counts, seed, bias_fn=None, dispatch="all_to_all", load="from_full",
                shape3d=False, **shape):
    """The module against GroveMoE; `counts` tokens per rank (all_to_all) or replicated."""
    E, S = shape.get("E", 8), shape.get("S", 2)
    bias = bias_fn(E, S, P) if bias_fn else None
    layer = full_layer(seed, bias=bias, **shape)
    H = layer.hidden_size
    x, g = _batch(seed, counts, H)
    ref = _reference(layer, x, g)
    if load == "from_full":
        ep = gkd.ExpertParallelGroveMoE.from_full(layer, dispatch=dispatch)
    else:
        ep = gkd.ExpertParallelGroveMoE.shard(
            layer.gate.weight.detach(), layer.w1.detach(), layer.w2.detach(), layer.a1.detach(),
            layer.a2.detach(), top_k=layer.top_k, group_size=S, expert_bias=layer.expert_bias,
            dispatch=dispatch)
    rows = _rows(counts, rank) if dispatch == "all_to_all" else slice(0, sum(counts))
    xr = x[rows].detach().clone().requires_grad_(True)
    xin = xr.reshape(2, -1, H) if shape3d else xr
    ep.train()
    y = ep(xin).reshape(-1, H)
    (y * g[rows]).sum().backward()
    ep.reduce_router_grad()
    out = _compare(ep, y, xr.grad, ref, rows)
    if dispatch == "all_to_all":
        info = ep.last_dispatch
        out["info"] = dict(send_rows=info.send_rows, recv_rows=info.recv_rows,
                           x_row_bytes=info.x_row_bytes, meta_row_bytes=info.meta_row_bytes,
                           dispatch_x_bytes=info.dispatch_x_bytes,
                           dispatch_meta_bytes=info.dispatch_meta_bytes,
                           combine_bytes=info.combine_bytes, tokens=info.tokens,
                           topk_ids=ep.last_topk_ids.tolist(), num_experts=ep.num_experts,
                           hidden=H, top_k=ep.top_k, group_size=S)
    return out


def case_functional(P, rank, *, counts, seed, dispatch, weight_dtype=None, **shape):
    """expert_parallel_grove_moe (routing included; d logits checked) or, with weight_dtype,
    dispatch_grove_experts on given routing weights of that dtype (the id bit-cast paths)."""
    layer = full_layer(seed, **shape)
    S, k = layer.group_size, layer.top_k
    x, g = _batch(seed, counts, layer.hidden_size)
    rows = _rows(counts, rank) if dispatch == "all_to_all" else slice(0, sum(counts))
    first, last = gkd.local_expert_range(layer.num_experts, S, P, rank)
    local = gkd.shard_experts(*(t.detach() for t in (layer.w1, layer.w2, layer.a1, layer.a2)),
                              group_size=S, world_size=P, rank=rank)
    local = [t.clone().requires_grad_(True) for t in local]
    full_w = [t.detach().clone().requires_grad_(True)
              for t in (layer.w1, layer.w2, layer.a1, layer.a2)]
    logits = layer.gate(x).detach().requires_grad_(True)
    xs = x.detach().clone().requires_grad_(True)
    if weight_dtype is None:
        y_ref = gk.grove_moe(xs, logits, *full_w, top_k=k, group_size=S)
        xr, lr = xs[rows].detach().requires_grad_(True), logits[rows].detach().requires_grad_(True)
        y = gkd.expert_parallel_grove_moe(xr, lr, *local, top_k=k, group_size=S,
                                          dispatch=dispatch)
        extra = (lr, logits)
    else:
        w, ids = gk.grove_topk(logits.detach(), k)
        w = w.to(weight_dtype).requires_grad_(True)
        y_ref = gk.fused_grove_experts(xs, *full_w, w, ids, group_size=S)
        xr, wr = xs[rows].detach().requires_grad_(True), w[rows].detach().requires_grad_(True)
        y = gkd.dispatch_grove_experts(xr, *local, wr, ids[rows], group_size=S)
        extra = (wr, w)
    (y_ref * g).sum().backward()
    (y * g[rows]).sum().backward()
    g0, g1 = first // S, last // S
    out = {"y": rel_err(y, y_ref[rows]), "dx": rel_err(xr.grad, xs.grad[rows]),
           "d_routing": rel_err(extra[0].grad, extra[1].grad[rows])}
    for name, t, ref, sl in zip(("w1", "w2", "a1", "a2"), local, full_w,
                                (slice(first, last),) * 2 + (slice(g0, g1),) * 2):
        out[name] = rel_err(t.grad, ref.grad[sl])
    return out


def case_selection_bias(P, rank, *, counts, seed):
    """update_selection_bias over the group's tokens equals the single-process update."""
    layer = full_layer(seed)
    x, _ = _batch(seed, counts, layer.hidden_size)
    ep = gkd.ExpertParallelGroveMoE.from_full(layer).train()
    layer.train()
    with torch.no_grad():
        layer(x)
        ep(x[_rows(counts, rank)])
    layer.update_selection_bias(layer.last_topk_ids, lr=0.1)
    ep.update_selection_bias(ep.last_topk_ids, lr=0.1)
    return {"bias": rel_err(ep.expert_bias, layer.expert_bias),
            "moved": float(layer.expert_bias.abs().max())}


def case_fresh_init(P, rank):
    """A module built without weights: the router comes from rank 0 whatever each rank's seed,
    and ranks seeded alike still get different expert shards."""
    out = {}
    for name, seed in (("seed_per_rank", 100 + rank), ("same_seed", 100)):
        torch.manual_seed(seed)
        ep = gkd.ExpertParallelGroveMoE(16, 8, 8, 2, 2, 4, dtype=F64)
        gate = [torch.empty_like(ep.gate.weight) for _ in range(P)]
        w1 = [torch.empty_like(ep.w1) for _ in range(P)]
        dist.all_gather(gate, ep.gate.weight.detach())
        dist.all_gather(w1, ep.w1.detach())
        out[name] = {"gate_equal": all(torch.equal(g, gate[0]) for g in gate),
                     "shards_distinct": all(not torch.equal(w1[i], w1[j]) for i in range(P)
                                            for j in range(i)),
                     "bound_ok": bool(ep.w1.abs().max() <= 16 ** -0.5)}
    return out


def case_meta_init(P, rank):
    """Deferred init: built on the meta device, materialised with to_empty, then
    reset_parameters (which broadcasts the router) - the path FSDP-style loaders take."""
    ep = gkd.ExpertParallelGroveMoE(16, 8, 8, 2, 2, 4, device="meta", dtype=torch.bfloat16)
    ep = ep.to_empty(device="cpu")
    ep.reset_parameters()
    first, last = gkd.local_expert_range(8, 2, P, rank)
    gate = [torch.empty_like(ep.gate.weight) for _ in range(P)]
    dist.all_gather(gate, ep.gate.weight.detach())
    y = ep(torch.randn(5, 16, dtype=torch.bfloat16))
    ep.double()
    return {"map_ok": torch.equal(ep.expert_map, gkd.local_expert_map(8, first, last)),
            "bias_fp32_zero": ep.expert_bias.dtype == torch.float32
            and not bool(ep.expert_bias.any()),
            "gate_equal": all(torch.equal(g, gate[0]) for g in gate),
            "forward_ok": list(y.shape) == [5, 16] and bool(torch.isfinite(y).all()),
            "map_after_double": ep.expert_map.dtype == torch.int32
            and torch.equal(ep.expert_map, gkd.local_expert_map(8, first, last))}


def case_bias_errors(P, rank):
    """update_selection_bias with an out-of-range id on rank 0 only: every rank raises (the
    count rides on the all-reduce), none waits for the others, and the bias is untouched."""
    ep = gkd.ExpertParallelGroveMoE.from_full(full_layer(15))
    ids = torch.tensor([[0, 1], [2, 3]])
    if rank == 0:
        ids[1, 0] = -1
    try:
        ep.update_selection_bias(ids, lr=0.1)
        out = {"error": "no error"}
    except IndexError as exc:
        out = {"error": str(exc)}
    out["untouched"] = not bool(ep.expert_bias.any())
    ep.update_selection_bias(ids.clamp(min=0), lr=0.1)  # the group still works after
    out["moved_after"] = bool(ep.expert_bias.any())
    return out


def case_errors(P, rank):
    """Errors every rank raises alike (none may leave the others waiting in a collective)."""
    out = {}
    try:  # G = 3 groups over P = 2 or 4 ranks
        gkd.ExpertParallelGroveMoE(8, 4, 6, 2, 2, 4)
        out["g_not_divisible"] = "no error"
    except ValueError as exc:
        out["g_not_divisible"] = str(exc)
    layer = full_layer(7)
    local = gkd.shard_experts(*(t.detach() for t in (layer.w1, layer.w2, layer.a1, layer.a2)),
                              group_size=2, world_size=P, rank=rank)
    x = torch.randn(3, layer.hidden_size, dtype=F64)
    w = torch.rand(3, 2)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    if rank == 0:  # only rank 0 has a bad id: the flag rides on the counts exchange
        ids[1, 1] = layer.num_experts
    try:
        gkd.dispatch_grove_experts(x, *local, w, ids)
        out["bad_ids"] = "no error"
    except IndexError as exc:
        out["bad_ids"] = str(exc)
    for name, call, exc_type in (
            ("dtype", lambda: gkd.dispatch_grove_experts(x.float(), *local, w, ids), TypeError),
            ("logits", lambda: gkd.expert_parallel_grove_moe(
                x, torch.randn(3, 5, dtype=F64), *local, top_k=2), ValueError)):
        try:
            call()
            out[name] = "no error"
        except exc_type as exc:
            out[name] = str(exc)
    # The group still works after the errors.
    y = gkd.dispatch_grove_experts(x, *local, w, ids.clamp(max=layer.num_experts - 1))
    out["after"] = list(y.shape)
    return out


# kind -> (the call on a rank that disagrees, what every rank must raise)
MISMATCH_KINDS = ("weights_dtype", "top_k", "hidden_size", "x_dtype", "no_grad",
                  "allreduce_tokens", "logits_columns", "module_hidden_size", "bad_ids")


def _mismatch_call(kind, bad, layer, local, ep):
    """The call of one mismatch case on this rank (`bad`: this rank disagrees)."""
    H, E = layer.hidden_size, layer.num_experts
    x = torch.randn(3, H, dtype=F64, requires_grad=True)
    w = torch.rand(3, 2, dtype=F64)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32) % E
    if kind == "weights_dtype" and bad:  # misaligned rows of (weights | ids) if unnoticed
        w = w.float()
    if kind == "top_k" and bad:
        w, ids = w[:, :1], ids[:, :1]
    if kind == "hidden_size" and bad:  # caught by this rank's own checks
        x = torch.randn(3, H + 1, dtype=F64)
    if kind == "x_dtype" and bad:
        x = x.detach().float()
    if kind == "bad_ids" and bad:
        ids[0, 0] = E
    if kind == "no_grad" and bad:  # this rank would skip the backward's collectives
        x = x.detach()
    if kind == "allreduce_tokens":  # the all_reduce style needs the same tokens everywhere
        T = 4 if bad else 3
        ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32)[:T] % E
        return gkd.allreduce_grove_experts(torch.randn(T, H, dtype=F64), *local,
                                           torch.rand(T, 2, dtype=F64), ids)
    if kind == "logits_columns":
        logits = torch.randn(3, E + (1 if bad else 0), dtype=F64)
        return gkd.expert_parallel_grove_moe(x, logits, *local, top_k=2)
    if kind == "module_hidden_size":
        return ep(torch.randn(2, H + (3 if bad else 0), dtype=F64))
    local = [t.detach() for t in local] if kind == "no_grad" and bad else local
    return gkd.dispatch_grove_experts(x, *local, w, ids)


def case_mismatch(P, rank):
    """Inputs that disagree across ranks, the disagreeing rank in every position: every rank
    raises the same error, quickly (no collective timeout), and the group works after."""
    if P == 1:
        return {}
    layer = full_layer(17)
    local = [p for p in gkd.shard_experts(layer.w1, layer.w2, layer.a1, layer.a2,
                                          group_size=2, world_size=P, rank=rank)]
    local = [t.detach().clone().requires_grad_() for t in local]
    ep = gkd.ExpertParallelGroveMoE.from_full(layer)
    out = {}
    for kind in MISMATCH_KINDS:
        for bad in range(P):
            start = time.monotonic()
            try:
                _mismatch_call(kind, rank == bad, layer, local, ep)
                error = "no error"
            except Exception as exc:  # noqa: BLE001  (the test compares every rank's)
                error = f"{type(exc).__name__}: {exc}"
            out[f"{kind}@{bad}"] = {"error": error, "seconds": time.monotonic() - start}
    x = torch.randn(3, layer.hidden_size, dtype=F64)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    out["after"] = list(gkd.dispatch_grove_experts(x, *local, torch.rand(3, 2, dtype=F64),
                                                   ids).shape)
    return out


def _bias_no_token_on_last_rank(E, S, P):
    b = torch.zeros(E)
    b[E - E // P:] = -10.0  # sigmoid ∈ (0, 1): these experts are never selected
    return b


def _bias_one_group(E, S, P):
    b = torch.zeros(E)
    g = (E // S) // 2  # a middle group (on rank P/2's side): every token picks its S experts
    b[g * S:(g + 1) * S] = 10.0
    return b


def cases(P):
    """name -> callable(rank) for world size P."""
    uneven = [5, 3, 7, 1][:P] if P > 1 else [6]
    return {
        "uneven": lambda r: case_module(P, r, counts=uneven, seed=1),
        "shard_3d": lambda r: case_module(P, r, counts=[4] * P, seed=2, load="shard",
                                          shape3d=True),
        "no_token_rank": lambda r: case_module(P, r, counts=uneven, seed=3,
                                               bias_fn=_bias_no_token_on_last_rank),
        "t0_rank": lambda r: case_module(P, r, counts=[0] + uneven[1:] if P > 1 else [0],
                                         seed=4),
        "one_group": lambda r: case_module(P, r, counts=uneven, seed=5, bias_fn=_bias_one_group),
        "top1": lambda r: case_module(P, r, counts=uneven, seed=6, k=1),
        "s4": lambda r: case_module(P, r, counts=uneven, seed=7, E=16, S=4, k=4),
        "s4_top3": lambda r: case_module(P, r, counts=uneven, seed=8, E=16, S=4, k=3),
        "allreduce_module": lambda r: case_module(P, r, counts=[6], seed=9,
                                                  dispatch="all_reduce"),
        "allreduce_functional": lambda r: case_functional(P, r, counts=[7], seed=10,
                                                          dispatch="all_reduce"),
        "functional": lambda r: case_functional(P, r, counts=uneven, seed=11,
                                                dispatch="all_to_all"),
        "weights_bf16": lambda r: case_functional(P, r, counts=uneven, seed=12,
                                                  dispatch="all_to_all",
                                                  weight_dtype=torch.bfloat16),
        "weights_fp64": lambda r: case_functional(P, r, counts=uneven, seed=13,
                                                  dispatch="all_to_all", weight_dtype=F64),
        "selection_bias": lambda r: case_selection_bias(P, r, counts=uneven, seed=14),
        "fresh_init": lambda r: case_fresh_init(P, r),
        "errors": lambda r: case_errors(P, r),
        "meta_init": lambda r: case_meta_init(P, r),
        "bias_errors": lambda r: case_bias_errors(P, r),
        "mismatch": lambda r: case_mismatch(P, r),
    }


def run(rank, world_size, port, out_dir):
    torch.set_num_threads(1)  # P processes share the CI machine's two cores
    # A rank stuck in a collective fails after the timeout instead of hanging the test.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        with gk.use_backend("torch"):
            results = {name: fn(rank) for name, fn in cases(world_size).items()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    except BaseException:
        record_error(rank, out_dir)
        raise
    finally:
        dist.destroy_process_group()


def record_error(rank, out_dir):
    """rank{r}.error: when it failed and why. The first rank to fail holds the cause; the
    others then fail in a collective, and the test shows every traceback, earliest first."""
    with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
        f.write(f"{time.time()!r}\n{traceback.format_exc()}")


def run_nccl_smoke(rank, world_size, port, out_dir):
    """GPU: the NCCL path against the single-process layer on the same device and backend
    (fp32, so the comparison is tight), and the host syncs of a forward: exactly one more than
    the single-process layer's (the counts read), with gk's value checks off."""
    import warnings

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        dev, counts = "cuda", [33] * world_size
        layer = full_layer(21, H=64, I=32, E=8, k=4, S=2, Ia=16, dtype=torch.float32,
                           device=dev)
        x, g = _batch(21, counts, 64, dtype=torch.float32, device=dev)
        ref = _reference(layer, x, g)
        ep = gkd.ExpertParallelGroveMoE.from_full(layer)
        rows = _rows(counts, rank)
        xr = x[rows].detach().clone().requires_grad_(True)
        y = ep(xr)
        (y * g[rows]).sum().backward()
        ep.reduce_router_grad()
        out = _compare(ep, y, xr.grad, ref, rows)
        gk.set_value_checks(False)
        syncs = {}
        for name, fn in (("single", lambda: layer(x[rows])), ("ep", lambda: ep(x[rows]))):
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()  # warm-up: first calls may load kernels
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
                caught.clear()
                fn()
                torch.cuda.set_sync_debug_mode("default")
            syncs[name] = sum("synchroniz" in str(w.message) for w in caught)
        out["syncs"] = syncs
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"nccl": out}, f)
    except BaseException:
        record_error(rank, out_dir)
        raise
    finally:
        dist.destroy_process_group()
