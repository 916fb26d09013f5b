"""`python -m bench.kernels`: where the time of one layer call goes, kernel by kernel.

    python -m bench.kernels [--preset grove-33b] [--tokens 16384,1024] [--routing uniform]
                            [--backends cuda,triton] [--variants grove,plain] [--layout default]
                            [--pass fwd] [--iters 5] [--json PATH]

For each (T, pass, variant, backend, layout) the call is built as the bench builds it
(bench/variants.py: the same weights, routing and inputs), run twice to warm up (Triton compiles,
the cuda backend packs its weight copies), then `--iters` times under torch.profiler. Output:
one table per call, a line per kernel (device kernels on a GPU, operators on a CPU): calls per
layer call, µs per layer call, share of the layer's kernel time; the JSON holds the same rows.
The sum is kernel time only (no launch gaps): compare it with the bench's CUDA-graph µs to see
the gaps, and each kernel with the bytes `python -m bench --traffic` models for its launch.
Timings are the profiler's, not CUDA-graph replays with L2 flushed: use them to split a call,
the bench to time it.
"""
import argparse
import collections
import json
import os
import sys

import torch

from bench import presets as presets_mod
from bench import routing as routing_mod
from bench import runner
from bench import variants as var


def _csv(text):
    return [x for x in text.split(",") if x]


def kernel_times(fn, iters, device_type):
    """[(name, calls per iteration, µs per iteration)] of `fn`'s kernels, largest first."""
    for _ in range(2):
        fn()
    if device_type == "cuda":
        torch.cuda.synchronize()
    activity = (torch.profiler.ProfilerActivity.CUDA if device_type == "cuda"
                else torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(iters):
            fn()
        if device_type == "cuda":
            torch.cuda.synchronize()
    calls, us = collections.Counter(), collections.Counter()
    for event in prof.events():
        if device_type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = event.device_time
        else:
            if event.cpu_parent is not None:  # top-level operators only: no double counting
                continue
            t = event.cpu_time
        calls[event.name] += 1
        us[event.name] += t
    return sorted(((n, calls[n] / iters, us[n] / iters) for n in us), key=lambda r: -r[2])


def table(title, rows):
    total = sum(r[2] for r in rows) or 1.0
    lines = [title, f"{'calls':>6} {'us':>9} {'share':>6}  kernel", "-" * 72]
    for name, calls, us in rows:
        short = name if len(name) <= 100 else name[:97] + "..."
        lines.append(f"{calls:6.1f} {us:9.1f} {100 * us / total:5.1f}%  {short}")
    lines.append(f"{'':>6} {sum(r[2] for r in rows):9.1f} 100.0%  (sum of kernel time)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, choices=sorted(presets_mod.PRESETS))
    p.add_argument("--tokens", type=lambda s: [int(x) for x in _csv(s)], default=None)
    p.add_argument("--routing", default="uniform", choices=routing_mod.MODES)
    p.add_argument("--backends", type=_csv, default=None)
    p.add_argument("--variants", type=_csv, default=["grove", "plain"])
    p.add_argument("--layout", type=_csv, default=["default"])
    p.add_argument("--pass", dest="pass_", choices=["fwd", "fwd+bwd"], default="fwd")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import grove_kernels as gk

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = presets_mod.PRESETS[args.preset or ("grove-33b" if device.type == "cuda" else "tiny")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = args.tokens or ([16384, 1024] if device.type == "cuda" else [33])
    backends = args.backends or var.cpu_safe_backends(device.type, gk.available_backends())
    unknown = [v for v in args.variants if v not in var.VARIANTS_BY_NAME]
    if unknown:
        p.error(f"--variants: unknown {unknown}")
    weights = var.make_weights(preset, device, dtype)
    caller = os.environ.get(runner.LAYOUT_VAR)
    results = []
    try:
        for T in tokens:
            logits = routing_mod.make_logits(args.routing, T, preset)
            w, ids = routing_mod.route(logits, preset, device)
            gen = torch.Generator().manual_seed(7 * T + 1)
            x = torch.randn(T, preset.hidden, generator=gen).to(device, dtype)
            grad = torch.randn(T, preset.hidden, generator=gen).to(device, dtype)
            for name in args.variants:
                variant = var.VARIANTS_BY_NAME[name]
                for backend in (backends if variant.per_backend else (variant.backend,)):
                    layouts = args.layout if variant.layouts else [None]
                    for layout in dict.fromkeys(runner.concrete_layout(lay, backend)
                                                if lay else None for lay in layouts):
                        runner._set_layout(layout, caller)
                        reason = var.skip_reason(variant, device, dtype, args.pass_)
                        if reason:
                            print(f"skip {name}/{backend}: {reason}", file=sys.stderr)
                            continue
                        fn = var.build(variant, backend, preset, weights, x, w, ids, args.pass_,
                                       grad)
                        rows = kernel_times(fn, args.iters, device.type)
                        title = (f"{preset.name} T={T} {args.routing} {args.pass_} {name}/"
                                 f"{backend}" + (f" [{layout}]" if layout else ""))
                        print(table(title, rows) + "\n")
                        results.append({"T": T, "pass": args.pass_, "variant": name,
                                        "backend": backend, "layout": layout,
                                        "kernels": [{"name": n, "calls": c, "us": u}
                                                    for n, c, u in rows]})
    finally:
        runner._set_layout(None, caller)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": runner.device_name(device), "preset": preset.name,
                       "dtype": str(dtype), "routing": args.routing, "commit": runner.git_commit(),
                       "calls": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
