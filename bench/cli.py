"""`python -m bench` argument parsing: arguments -> runner.Config -> sweep -> table / JSON / CSV.

Defaults follow DESIGN §6: preset grove-33b, T ∈ {1, 8, …, 16384} on a GPU (each preset's
small sweep on a CPU), uniform routing, every gk backend, both passes, bf16 on a GPU and
fp32 on a CPU. `--smoke` is a CPU run that finishes in seconds: tiny preset, three T, both
passes, the torch backend (Triton on a CPU is its interpreter: it would time Python).
"""
import argparse
import sys

import torch

import grove_kernels as gk
from bench import presets, report, runner
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
                   help=f"comma list of {','.join(v.name for v in VARIANTS)} (default all)")
    p.add_argument("--pass", dest="pass_", choices=sorted(PASS_CHOICES), default="both")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda if available; "
                   "cpu with --smoke)")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--smoke", action="store_true",
                   help="quick CPU run: tiny preset, T=1,16,64, both passes, short timing")
    p.add_argument("--quick", action="store_true", help="shorter timing (noisier)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the untimed correctness check of each variant")
    p.add_argument("--seed", type=int, default=0)
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
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    return runner.Config(
        preset=preset, tokens=tuple(tokens), routings=tuple(args.routing), backends=backends,
        variants=tuple(VARIANTS_BY_NAME[n] for n in names), passes=PASS_CHOICES[args.pass_],
        dtype=dtype, device=device, check=args.check, quick=args.quick or args.smoke,
        seed=args.seed)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    result = runner.run(cfg)
    if args.json:
        report.write_json(result, args.json)
    if args.csv:
        report.write_csv(result, args.csv)
    print(report.format_table(result))
    sys.stdout.flush()
    return 0
