"""The summary table of scripts/gpu_check.sh, from the bench JSON files of its run:

    python3 scripts/gpu_summary.py OUT_DIR/bench_uniform.json [OUT_DIR/bench_coactive.json ...]

One line per (routing, T, backend), µs of one call (forward unless said):
    plain        the plain MoE layer on that backend
    sections     the Grove layer, sections layout;  folded: the folded layout
    fold/sect    folded / sections (below 1: folding pays)
    fold/plain   folded / the plain layer on the same backend (the price of the adjugates)
    fold/vLLM    folded / vLLM's plain fused_experts (the aim: at or below 1)
    f+b sect, f+b fold   forward + backward µs;  f+b/fwd   folded fwd+bwd over folded fwd
A row whose check is not ok is marked "!" (its time means nothing); "-" means no such row
(skipped, or the run was cut by its time limit). Rows without a `layout` field take it from
their file's name (bench_<routing>_<part>_<layout>.json, a bench without the layout axis run
once per layout), else are the sections layout. A file named bench_<routing>@<setting>.json is a
run under another setting of the environment (gpu_check.sh's `settings` stage): its backends
are listed as <backend>@<setting>, and its vLLM rows are left out (they repeat the main run's).
"""
import json
import os
import sys


def load(paths):
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"{path}: not read ({type(exc).__name__}: {exc})")
            continue
        state = "complete" if result.get("complete", True) else "cut short"
        config = result.get("config", {})
        print(f"{path}: {len(result.get('rows', []))} rows, {state}; device "
              f"{result.get('device', '?')}, preset {config.get('preset', {}).get('name', '?')}, "
              f"{config.get('dtype', '?')}, commit {str(result.get('commit'))[:9]}")
        # A bench without the layout axis ran once per layout, into files named by it.
        name = os.path.basename(path)
        hint = next((x for x in ("folded", "sections") if f"_{x}." in name), None)
        setting = name[:-len(".json")].partition("@")[2] if name.endswith(".json") else ""
        for r in result.get("rows", []):
            if hint and not r.get("layout"):
                r = dict(r, layout=hint)
            if setting:
                if r.get("variant") == "vllm":
                    continue
                r = dict(r, backend=f"{r['backend']}@{setting}")
            rows.append(r)
    return rows


def index(rows):
    """{(routing, T, pass, variant, backend, layout): (us, ok)}."""
    out = {}
    for r in rows:
        layout = r.get("layout") or "sections"
        if r["variant"] != "grove":
            layout = "-"  # the plain layers have no adjugate layout
        key = (r["routing"], r["T"], r["pass"], r["variant"], r["backend"], layout)
        if key not in out or r["us"] < out[key][0]:
            out[key] = (r["us"], r.get("check") in ("ok", "unchecked"))
    return out


def _us(v):
    if v is None:
        return f"{'-':>8}"
    us, ok = v
    return f"{us:7.0f}{'' if ok else '!'}".rjust(8)


def _ratio(a, b):
    if a is None or b is None or not b[0]:
        return f"{'-':>7}"
    return f"{a[0] / b[0]:6.2f}{'' if a[1] and b[1] else '!'}".rjust(7)


def table(rows):
    ix = index(rows)
    combos = sorted({(k[0], k[1], k[4]) for k in ix if k[3] in ("grove", "plain")},
                    key=lambda c: (c[0], c[1], c[2]))
    width = max([7] + [len(c[2]) for c in combos])
    head = (f"{'routing':<9} {'T':>6} {'backend':<{width}} {'vLLM':>8} {'plain':>8} {'sections':>8} "
            f"{'folded':>8} {'fold/sect':>9} {'fold/plain':>10} {'fold/vLLM':>9} "
            f"{'f+b sect':>8} {'f+b fold':>8} {'f+b/fwd':>7}")
    lines = ["gpu_check summary: µs per call (fwd unless f+b)", head, "-" * len(head)]
    for routing, T, backend in combos:
        def get(pass_, variant, layout, be=backend):
            return ix.get((routing, T, pass_, variant, be, layout))
        vllm = get("fwd", "vllm", "-", "vllm")
        plain = get("fwd", "plain", "-")
        sect, fold = get("fwd", "grove", "sections"), get("fwd", "grove", "folded")
        fb_sect, fb_fold = get("fwd+bwd", "grove", "sections"), get("fwd+bwd", "grove", "folded")
        lines.append(f"{routing:<9} {T:>6} {backend:<{width}} {_us(vllm)} {_us(plain)} {_us(sect)} "
                     f"{_us(fold)} {_ratio(fold, sect):>9} {_ratio(fold, plain):>10} "
                     f"{_ratio(fold, vllm):>9} {_us(fb_sect)} {_us(fb_fold)} "
                     f"{_ratio(fb_fold, fold)}")
    if not combos:
        lines.append("(no grove / plain rows: the bench stages produced nothing)")
    return "\n".join(lines)


def main(argv=None):
    paths = sys.argv[1:] if argv is None else argv
    rows = load(paths)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
