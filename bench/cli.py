"""`python -m bench` argument parsing: arguments -> runner.Config -> sweep -> table / JSON / CSV.

Defaults follow docs/design.md §6: preset grove-33b, T ∈ {1, 8, …, 16384} on a GPU (each
preset's small sweep on a CPU), uniform routing, every gk backend, both passes, bf16 on a GPU and
fp32 on a CPU. `--smoke` is a CPU run that finishes in seconds: tiny preset, three T, both
passes, the torch backend (Triton on a CPU is its interpreter: it would time Python).

Outputs: the table on stdout; `--json` (rewritten after every row with "complete": false
until the sweep ends, so a run cut short keeps its rows), `--csv`, `--plot` (a PNG, needs
matplotlib) where asked; `--results-dir DIR` writes the JSON and the PNG into DIR as
`<device>_<date>.json/.png` (bench/results/README.md). On stderr a line per row, and a
progress bar while stderr is a terminal; `--quiet` drops both. Output paths are checked
before the sweep, not after it: a GPU sweep takes minutes, and a typo in a path or a missing
matplotlib should not cost them.
"""
import argparse
import functools
import os
import sys

import torch

import grove_kernels as gk
from bench import plot, presets, report, runner
from bench.routing import MODES
from bench.variants import VARIANTS, VARIANTS_BY_NAME, cpu_safe_backends

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASS_CHOICES = {"fwd": ("fwd",), "fwd+bwd": ("fwd+bwd",), "both": ("fwd", "fwd+bwd")}


def _csv_list(text):
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _int_list(text):
    try:
        values = tuple(int(s) for s in _csv_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens: expected integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--tokens: expected positive integers, got {text!r}")
    return values


def _world_sizes(text):
    try:
        values = tuple(int(s) for s in _csv_list(text))
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--ep-world-size: expected positive integers, got "
                                         f"{text!r}")
    return values


def build_parser():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets.PRESETS), default=None,
                   help="layer shape (default grove-33b; tiny with --smoke)")
    p.add_argument("--tokens", type=_int_list, default=None,
                   help="comma list of T (default 1,8,64,256,1024,4096,16384 on GPU)")
    p.add_argument("--routing", type=_csv_list, default=("uniform",),
                   help=f"comma list of {'|'.join(MODES)} (default uniform)")
    p.add_argument("--backends", type=_csv_list, default=None,
                   help="comma list of gk backends (default: gk.available_backends())")
    p.add_argument("--variants", type=_csv_list, default=None,
                   help=f"comma list of {','.join(v.name for v in VARIANTS)} (default all). "
                   "grouped_mm*: torch._grouped_mm layers (the usual form; -index_add: the "
                   "bench's first one); liger, liger-2call, scattermoe: the training anchors "
                   "(GPU only; skipped with the reason where not importable); "
                   "bench/variants.py describes each")
    p.add_argument("--layout", type=_csv_list, default=None,
                   help="comma list of adjugate layouts, default|sections|folded (default: "
                   "default, the layout each backend runs when GROVE_ADJUGATE_LAYOUT is unset; "
                   "sections and folded with --traffic): GROVE_ADJUGATE_LAYOUT for each call "
                   "of the gk Grove layer; rows carry the layout that ran")
    p.add_argument("--pass", dest="pass_", choices=sorted(PASS_CHOICES), default="both")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda if available; "
                   "cpu with --smoke)")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: µs and %% of floor against T, "
                   "a line per variant/backend/pass/routing (needs matplotlib)")
    p.add_argument("--results-dir", metavar="DIR",
                   help="record the run in DIR as <device>_<date>.json and .png (the PNG "
                   "only where matplotlib is importable); see bench/results/README.md")
    p.add_argument("--quiet", action="store_true",
                   help="nothing on stderr but warnings: no per-row lines, no progress bar")
    p.add_argument("--smoke", action="store_true",
                   help="quick CPU run: tiny preset, T=1,16,64, both passes, short timing")
    p.add_argument("--quick", action="store_true", help="shorter timing (noisier)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the untimed correctness check of each variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ep-world-size", type=_world_sizes, default=None, metavar="P[,P...]",
                   help="instead of timing: bytes per token an expert-parallel layer sends "
                   "over P simulated ranks (token-once vs per-expert vs released dispatch; "
                   "bench/ep_traffic.py); uses --preset, --tokens, --routing, --dtype, --json")
    p.add_argument("--traffic", action="store_true",
                   help="instead of timing: the modelled HBM bytes and FLOPs of every launch "
                   "(triton, cuda x sections, folded x grove, plain; no GPU needed; "
                   "bench/traffic.py); uses --preset, --tokens, --routing, --pass, --dtype, "
                   "--backends, --json")
    p.add_argument("--traffic-device", metavar="NAME", default=None,
                   help="the GPU --traffic models, as torch.cuda.get_device_name() says it "
                   "(default NVIDIA H200): its tile configurations and SM count")
    return p


def config_from_args(args, parser):
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    preset = presets.get_preset(args.preset or (presets.SMOKE_PRESET if args.smoke
                                                else "grove-33b"))
    tokens = args.tokens or (presets.SMOKE_TOKENS if args.smoke
                             else presets.default_tokens(preset, device.type))
    bad = [m for m in args.routing if m not in MODES]
    if bad or not args.routing:
        parser.error(f"--routing: unknown {bad}; choose from {MODES}")
    available = gk.available_backends()
    if args.backends is None:
        backends = tuple(available)
        if args.smoke:
            backends = cpu_safe_backends(device.type, backends)
    else:
        backends = args.backends
        missing = [b for b in backends if b not in available]
        if missing:
            parser.error(f"--backends: {missing} not available here (available: {available})")
    names = args.variants or tuple(v.name for v in VARIANTS)
    unknown = [n for n in names if n not in VARIANTS_BY_NAME]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS_BY_NAME)}")
    layouts = tuple(dict.fromkeys(args.layout or ("default",)))
    bad = [lay for lay in layouts if lay not in ("default", "sections", "folded")]
    if bad or not layouts:
        parser.error(f"--layout: unknown {bad}; choose from default, sections, folded")
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    return runner.Config(
        preset=preset, tokens=tuple(tokens), routings=tuple(args.routing), backends=backends,
        variants=tuple(VARIANTS_BY_NAME[n] for n in names), passes=PASS_CHOICES[args.pass_],
        dtype=dtype, device=device, check=args.check, quick=args.quick or args.smoke,
        seed=args.seed, layouts=layouts)


def check_outputs(args, parser):
    """Fails now, not after the sweep, on an output that cannot be written. Returns whether
    --results-dir gets a PNG (False: matplotlib missing; the JSON is still recorded)."""
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if path:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                parser.error(f"{flag} {path}: folder {parent} does not exist")
    if args.plot:
        try:
            plot.require_matplotlib("--plot")
        except RuntimeError as exc:
            parser.error(str(exc))
    if not args.results_dir:
        return False
    try:
        os.makedirs(args.results_dir, exist_ok=True)
    except OSError as exc:
        parser.error(f"--results-dir {args.results_dir}: {exc}")
    try:
        plot.require_matplotlib("--results-dir's PNG")
    except RuntimeError as exc:
        # The JSON is the record and `python -m bench.plot` redraws the PNG from it later:
        # a missing plotting library is no reason to refuse to record a run.
        print(f"warning: {exc}; recording the JSON only", file=sys.stderr)
        return False
    return True


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ep_world_size:
        from bench import ep_traffic
        return ep_traffic.main(args, parser)
    if args.traffic:
        from bench import traffic
        return traffic.main(args, parser)
    cfg = config_from_args(args, parser)
    results_png = check_outputs(args, parser)
    if args.quiet:
        cfg.log = None
    if args.json:
        # Rewritten after every row: a run cut short (a device's time limit) keeps its rows.
        cfg.on_row = functools.partial(report.write_json, path=args.json)
    result = runner.run(cfg)
    written = []
    if args.json:
        report.write_json(result, args.json)
        written.append(args.json)
    if args.csv:
        report.write_csv(result, args.csv)
        written.append(args.csv)
    if args.results_dir:
        json_path, png_path = report.results_paths(result, args.results_dir)
        report.write_json(result, json_path)
        written.append(json_path)
    # Figures after every JSON: a plotting failure must not lose the measurements.
    if args.plot:
        plot.write_plot(result, args.plot)
        written.append(args.plot)
    if args.results_dir and results_png:
        plot.write_plot(result, png_path)
        written.append(png_path)
    elif args.results_dir:
        print(f"warning: no PNG in {args.results_dir} (matplotlib missing); draw it later "
              f"with `python -m bench.plot {json_path}`", file=sys.stderr)
    print(report.format_table(result))
    sys.stdout.flush()
    if not args.quiet:
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0
