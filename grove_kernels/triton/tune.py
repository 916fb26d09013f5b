"""`python -m grove_kernels.triton.tune`: measure tile configurations, write configs.json.

For each token count T of a preset (grove-33b by default) the candidates run through the real
`fused_grove_experts` (routing fixed, uniform logits), are checked against the torch backend
and timed (triton.testing.do_bench, median). The search is a coordinate descent, a sum of
grids rather than their product, so a run fits in minutes: per block height BM, first the
GEMM-1 tile by forward time (the forward is GEMM-1 + GEMM-2), then the row-wise tile and the
weight-gradient tile by forward + backward time, each from the best so far. The fastest
correct Config per T becomes a bucket keyed by its rows per expert (T·k / E), stored under the
GPU's name and the shape "H,I,Ia,E,k"; config.select picks it up on that device and keeps its
heuristic elsewhere. `--budget-s` stops the search in time and keeps what was measured.

    python -m grove_kernels.triton.tune --out grove_kernels/triton/configs.json
    python -m grove_kernels.triton.tune --smoke      # `micro` preset, 2 candidates (interpreter)
"""
import argparse
import itertools
import json
import os
import time

import torch

import grove_kernels as gk

from .. import _validate
from ..presets import PRESETS
from . import config as cfg

# Token counts the tuner measures at on a GPU; other presets use their CPU sweep.
GPU_TOKENS = {"grove-33b": (16, 64, 256, 1024, 4096, 16384)}
SMOKE_PRESET = "micro"


def candidates(block_m, smoke=False):
    """(base Config, GEMM-1 tiles, row-wise tiles, wgrad tiles) searched for one BM."""
    if smoke:
        base = cfg.Config(16, (16, 32, 1, 1), (32, 32, 1, 1), (16, 32, 16, 1, 1))
        return base, [(32, 16, 1, 1)], [(16, 16, 1, 1)], [(32, 16, 16, 1, 1)]
    warps = 4 if block_m <= 64 else 8
    gemm1 = [(bn, bk, warps, st) for bn, bk, st in itertools.product((32, 64, 128), (64, 128),
                                                                      (3, 4))]
    rows = [(bn, bk, warps, st) for bn, bk, st in itertools.product((64, 128), (64, 128), (3, 4))]
    wgrad = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)]
    base = cfg._heuristic(block_m)
    return cfg.Config(block_m, base.gemm1, base.rows, base.wgrad), gemm1, rows, wgrad


def _timer(smoke):
    if smoke:
        def wall(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return wall
    from triton.testing import do_bench
    return lambda fn: do_bench(fn, warmup=10, rep=50)


def _problem(T, H, E, k, I, S, Ia, device, dtype):
    g = torch.Generator().manual_seed(T)

    def mk(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(device, dtype)

    x = mk(T, H)
    weights = [mk(E, 2 * I, H), mk(E, H, I), mk(E // S, 2 * Ia, H), mk(E // S, H, Ia)]
    w, ids = gk.grove_topk(torch.randn(T, E, generator=g).to(device), k)
    return x, weights, w, ids


def _measure(conf, problem, S, timer, ref, backward):
    """Forward (backward=False) or forward + backward time in ms of `conf`; None when its
    forward is wrong."""
    x, weights, w, ids = problem
    leaves = [t.detach().requires_grad_() for t in [x, *weights, w]]
    dy = torch.randn_like(x)

    def fwd():
        return gk.fused_grove_experts(leaves[0], *leaves[1:5], leaves[5], ids, group_size=S)

    def fwd_bwd():
        torch.autograd.grad(fwd(), leaves, dy)

    with gk.use_backend("triton"), cfg.forced(conf):
        y = fwd()
        err = float((y.detach().float() - ref.float()).norm() / ref.float().norm())
        if not err <= 2e-2:
            return None
        return timer(fwd_bwd if backward else fwd)


def _search(T, bm, problem, S, timer, ref, smoke, deadline, log):
    """Coordinate descent over one BM: [(Config, fwd ms, fwd+bwd ms)] of the best found."""
    base, gemm1, rows, wgrad = candidates(bm, smoke)

    def run(conf, backward):
        if time.monotonic() > deadline:
            return None
        try:
            t = _measure(conf, problem, S, timer, ref, backward)
        except Exception as exc:  # a config over the shared-memory limit, say
            log(f"T={T} {conf}: failed ({type(exc).__name__}: {str(exc)[:80]})")
            return None
        log(f"T={T} {conf}: {'fwd+bwd' if backward else 'fwd'} "
            + ("wrong result, skipped" if t is None else f"{t * 1e3:.0f} us"))
        return t

    def best_of(confs, backward):
        timed = [(t, c) for c in confs for t in [run(c, backward)] if t is not None]
        return min(timed, key=lambda tc: tc[0]) if timed else (None, None)

    _, conf = best_of([base] + [cfg.Config(bm, g, base.rows, base.wgrad) for g in gemm1
                                if g != base.gemm1], backward=False)
    if conf is None:
        return None
    t_fb, conf = best_of([conf] + [cfg.Config(bm, conf.gemm1, r, conf.wgrad) for r in rows
                                   if r != conf.rows], backward=True)
    if conf is None:
        return None
    t2, conf2 = best_of([cfg.Config(bm, conf.gemm1, conf.rows, w) for w in wgrad
                         if w != conf.wgrad], backward=True)
    if conf2 is not None and t2 < t_fb:
        t_fb, conf = t2, conf2
    t_f = run(conf, backward=False)
    return None if t_f is None else (conf, t_f, t_fb)


def tune(preset, tokens, dtype, smoke=False, budget_s=None, log=print):
    # Host-side id checks read tensors back: keep them out of the timings, and restore the
    # caller's setting after.
    with _validate.value_checks(False):
        return _tune(preset, tokens, dtype, smoke, budget_s, log)


def _tune(preset, tokens, dtype, smoke, budget_s, log):
    p = PRESETS[preset]
    H, E, k, I, S, Ia = p.hidden, p.experts, p.top_k, p.intermediate, p.group_size, \
        p.adj_intermediate
    device = "cpu" if smoke else "cuda"
    timer = _timer(smoke)
    deadline = time.monotonic() + (budget_s if budget_s else float("inf"))
    buckets = []
    for T in tokens:
        problem = _problem(T, H, E, k, I, S, Ia, device, dtype)
        with gk.use_backend("torch"):
            ref = gk.fused_grove_experts(problem[0], *problem[1], problem[2], problem[3],
                                         group_size=S)
        rows = T * k / E
        # Row blocks taller than twice the mean rows per expert are mostly masked rows.
        block_ms = [16] if smoke else [bm for bm in (16, 32, 64, 128) if bm <= max(16, 2 * rows)]
        found = [r for bm in block_ms
                 for r in [_search(T, bm, problem, S, timer, ref, smoke, deadline, log)]
                 if r is not None]
        if found:
            conf, t_f, t_fb = min(found, key=lambda r: r[2])
            buckets.append({"T": T, "rows_per_problem": rows, "block_m": conf.block_m,
                            "gemm1": list(conf.gemm1), "rows": list(conf.rows),
                            "wgrad": list(conf.wgrad), "fwd_us": t_f * 1e3,
                            "fwd_bwd_us": t_fb * 1e3})
        if time.monotonic() > deadline:
            log(f"tune: time budget spent at T={T}; larger token counts keep the heuristic")
            break
    cut = time.monotonic() > deadline
    # A bucket serves rows-per-problem up to the midpoint towards the next measured T; the
    # last one serves every larger T unless the budget cut the search short.
    for b, nxt in zip(buckets, buckets[1:] + [None]):
        if nxt:
            b["max_rows_per_problem"] = (b["rows_per_problem"] + nxt["rows_per_problem"]) / 2
        else:
            b["max_rows_per_problem"] = b["rows_per_problem"] if cut else float("inf")
    return f"{H},{I},{Ia},{E},{k}", buckets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="grove-33b")
    parser.add_argument("--tokens", default=None, help="comma list (default: the preset's)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--out", default=None, help="configs.json to merge the result into")
    parser.add_argument("--smoke", action="store_true",
                        help=f"the {SMOKE_PRESET} preset on the interpreter")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop searching after this many seconds (keep what was measured)")
    args = parser.parse_args(argv)
    preset = SMOKE_PRESET if args.smoke else args.preset
    tokens = ([int(t) for t in args.tokens.split(",")] if args.tokens
              else GPU_TOKENS.get(preset, PRESETS[preset].cpu_tokens))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("tune: needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    key, buckets = tune(preset, tokens, dtype, smoke=args.smoke, budget_s=args.budget_s)
    device = "interpreter" if args.smoke else torch.cuda.get_device_name()
    if args.out:
        table = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                table = json.load(f)
        table.setdefault(device, {})[key] = buckets
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
    print(json.dumps({device: {key: buckets}}, indent=1))


if __name__ == "__main__":
    main()
