"""`python -m bench --traffic`: the modelled HBM bytes and FLOPs of every launch of one call,
per backend (triton, cuda) x adjugate layout (sections, folded) x variant (grove, plain),
counted on the CPU (no GPU, no interpreter, no extension) from the real plan of the routing and
the tiles the kernels would use on the modelled GPU (--traffic-device, default NVIDIA H200).

    routing (bench/routing.py) -> topk [T, k] -> plan (grove_kernels.plan / plan_folded)
    -> grove_kernels.traffic.plan_launches + <backend>/traffic.launches -> rows

The byte model (grove_kernels/traffic.py): hbm_bytes = Σ over launches of the distinct bytes
each reads (perfect L2 reuse inside a launch, none across launches) + the bytes it writes;
load_bytes = what the programs load with no reuse between them (the pessimistic bound).
plain rows are the layer without adjugates (no layout: the same row under each layout).
With --json PATH the rows (each launch listed) go to PATH.
"""
import json
import sys

import torch

from bench import presets
from bench.routing import MODES, make_logits, route
from grove_kernels.plan import build_plan
from grove_kernels.traffic import DEFAULT_DEVICE, LAYOUTS, plan_launches, total

BACKENDS = ("triton", "cuda")
VARIANTS = ("grove", "plain")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASS_CHOICES = {"fwd": ("fwd",), "fwd+bwd": ("fwd+bwd",), "both": ("fwd", "fwd+bwd")}


def _backend_launches(backend):
    if backend == "triton":
        from grove_kernels.triton.traffic import launches
    else:
        from grove_kernels.cuda.traffic import launches
    return launches


def build(topk_ids, topk_weights, preset, variant, layout):
    """The plan the op layer builds for this call (torch reference; the Triton plan stage
    builds the same tensors)."""
    if variant == "plain":
        return build_plan(topk_ids, topk_weights, preset.experts)
    if layout == "folded":
        from grove_kernels.plan_folded import build_folded_plan
        return build_folded_plan(topk_ids, topk_weights, preset.experts, preset.group_size,
                                 preset.adj_scale)
    return build_plan(topk_ids, topk_weights, preset.experts, preset.group_size,
                      preset.adj_scale)


def weights_shapes(preset, variant):
    H, E, I, G, Ia = (preset.hidden, preset.experts, preset.intermediate, preset.groups,
                      preset.adj_intermediate)
    grove = variant == "grove"
    return ((E, 2 * I, H), (E, H, I), (G, 2 * Ia, H) if grove else None,
            (G, H, Ia) if grove else None)


def row(backend, layout, variant, pass_, plan, preset, dtype, device_name, routing, T):
    launches = plan_launches(plan) + _backend_launches(backend)(
        plan, (T, preset.hidden), weights_shapes(preset, variant), dtype, layout, pass_,
        device_name)
    launches = [l for l in launches if l is not None]
    hbm, flops = total(launches)
    return {
        "backend": backend, "layout": layout, "variant": variant, "tokens": T,
        "routing": routing, "pass": pass_, "hbm_bytes": hbm, "flops": flops,
        "read_bytes": sum(l.read_bytes for l in launches),
        "write_bytes": sum(l.write_bytes for l in launches),
        # Launches without a tile model (torch ops, plan) load what they read.
        "load_bytes": sum((l.load_bytes or l.read_bytes) + l.write_bytes for l in launches),
        "programs": sum(l.programs for l in launches),
        "idle_programs": sum(l.idle_programs for l in launches),
        "launches": [l.as_dict() for l in launches],
    }


def simulate(preset, tokens, routings, passes, layouts, backends, dtype, device_name, seed=0):
    rows, notes = [], []
    for mode in routings:
        for T in tokens:
            w, ids = route(make_logits(mode, T, preset, seed), preset, "cpu")
            plans = {}
            for variant in VARIANTS:
                for layout in layouts:
                    key = (variant, layout if variant == "grove" else "-")
                    if key not in plans:
                        plans[key] = build(ids, w, preset, variant, layout)
                    for backend in backends:
                        for pass_ in passes:
                            try:
                                rows.append(row(backend, layout, variant, pass_, plans[key],
                                                preset, dtype, device_name, mode, T))
                            except ValueError as exc:  # a dtype the backend does not run
                                if str(exc) not in notes:
                                    notes.append(str(exc))
                                    print(f"skip {backend}: {exc}", file=sys.stderr)
    return rows


def ratios(rows):
    """{(routing, T, pass, backend, layout): grove hbm / plain hbm}."""
    plain = {(r["routing"], r["tokens"], r["pass"], r["backend"]): r["hbm_bytes"]
             for r in rows if r["variant"] == "plain"}
    return {(r["routing"], r["tokens"], r["pass"], r["backend"], r["layout"]):
            r["hbm_bytes"] / plain[(r["routing"], r["tokens"], r["pass"], r["backend"])]
            for r in rows if r["variant"] == "grove"}


def _gb(b):
    return f"{b / 1e9:8.4g}"


def format_table(rows, per_launch=True):
    lines = []
    if per_launch:
        head = (f"  {'launch':<66} {'programs':>9} {'idle':>7} {'read MB':>9} {'write MB':>9} "
                f"{'GFLOP':>8}")
        for r in rows:
            if r["variant"] == "plain" and r["layout"] != LAYOUTS[0] and \
                    LAYOUTS[0] in {x["layout"] for x in rows}:
                continue
            lines.append(f"{r['backend']} / {r['layout']} / {r['variant']}  {r['routing']} "
                         f"T={r['tokens']} {r['pass']}")
            lines.append(head)
            for l in r["launches"]:
                lines.append(f"  {l['name'][:66]:<66} {l['programs']:>9} {l['idle_programs']:>7} "
                             f"{l['read_bytes'] / 1e6:9.1f} {l['write_bytes'] / 1e6:9.1f} "
                             f"{l['flops'] / 1e9:8.1f}")
            lines.append("")
    q = ratios(rows)
    head = (f"{'routing':<9} {'T':>6} {'pass':<7} {'backend':<7} {'layout':<9} {'variant':<6} "
            f"{'HBM GB':>8} {'TFLOP':>7} {'launches':>8} {'programs':>9} {'idle':>7} "
            f"{'x plain':>7}")
    lines += ["modelled traffic per call (HBM = distinct bytes read per launch + bytes written)",
              head, "-" * len(head)]
    for r in rows:
        ratio = (q.get((r["routing"], r["tokens"], r["pass"], r["backend"], r["layout"]))
                 if r["variant"] == "grove" else None)
        lines.append(
            f"{r['routing']:<9} {r['tokens']:>6} {r['pass']:<7} {r['backend']:<7} "
            f"{r['layout']:<9} {r['variant']:<6} {_gb(r['hbm_bytes'])} "
            f"{r['flops'] / 1e12:7.3f} {len(r['launches']):>8} {r['programs']:>9} "
            f"{r['idle_programs']:>7} {'' if ratio is None else f'{ratio:7.3f}':>7}")
    return "\n".join(lines)


def main(args, parser):
    """The --traffic run of `python -m bench` (argparse namespace from bench.cli)."""
    for name in ("csv", "plot", "results_dir", "variants", "ep_world_size"):
        if getattr(args, name, None) not in (None, False):
            parser.error(f"--{name.replace('_', '-')}: not used with --traffic")
    preset = presets.get_preset(args.preset or (presets.SMOKE_PRESET if args.smoke
                                                else "grove-33b"))
    bad = [m for m in args.routing if m not in MODES]
    if bad:
        parser.error(f"--routing: unknown {bad}; choose from {MODES}")
    backends = args.backends or BACKENDS
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"--backends: {unknown} have no traffic model (modelled: {BACKENDS})")
    layouts = tuple(getattr(args, "layout", None) or LAYOUTS)
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        parser.error(f"--layout: unknown {unknown}; choose from {LAYOUTS}")
    dtype_name = args.dtype or "bf16"
    tokens = args.tokens or (presets.SMOKE_TOKENS if args.smoke else presets.GPU_TOKENS)
    device_name = args.traffic_device or DEFAULT_DEVICE
    rows = simulate(preset, tokens, args.routing, PASS_CHOICES[args.pass_], layouts, backends,
                    DTYPES[dtype_name], device_name, args.seed)
    if args.json:
        result = {"kind": "traffic", "preset": preset.as_dict(), "dtype": dtype_name,
                  "device_name": device_name, "seed": args.seed,
                  "model": "hbm_bytes = distinct bytes read per launch + bytes written; "
                           "load_bytes: no reuse between programs (grove_kernels/traffic.py)",
                  "rows": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(format_table(rows, per_launch=not args.quiet))
    sys.stdout.flush()
    if args.json and not args.quiet:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
