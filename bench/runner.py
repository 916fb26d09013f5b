"""The sweep: (routing, T) problems × passes × variants × layouts × backends -> rows (dicts).

For each routing mode and T: logits [T, E] -> gk.grove_topk once (outside timing) -> the cost
model on the host -> per pass, per variant, per backend: build the callable, run it once and
check it (rel err of y, or of every gradient, vs the torch backend's result for the same layer
in the same dtype; NaN/inf flagged), then time it. A variant that cannot run here, or raises,
becomes an entry of `skipped` with the reason instead of a row: the sweep goes on.
Layouts: the adjugate layouts (GROVE_ADJUGATE_LAYOUT, set for the build, check and timing of
a cell, restored when the sweep ends) of the variants whose calls read it (Variant.layouts);
other variants run once, under the caller's setting, their rows with layout None. References
are computed under the default layout (sections).
Each (routing, T, pass, variant, layout, backend) is one cell of the progress bar (bench.progress):
one line per row on `Config.log`, the bar under them when that stream is a terminal.
"""
import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

import torch

import grove_kernels as gk
from grove_kernels import _validate
from bench import anchors
from bench import cost as cost_model
from bench import routing as routing_mod
from bench import timing, variants as var
from bench.progress import ProgressBar

ROW_KEYS = ("preset", "routing", "T", "pass", "variant", "layout", "backend", "us", "tflops",
            "gbps", "floor_us", "pct_floor", "distinct_groups")
LAYOUT_VAR = "GROVE_ADJUGATE_LAYOUT"
EXTRA_KEYS = ("vs_baseline", "flops", "bytes", "timing", "rel_err", "check")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Config:
    preset: object  # bench.presets.Preset
    tokens: tuple
    routings: tuple
    backends: tuple
    variants: tuple  # of bench.variants.Variant
    passes: tuple
    dtype: torch.dtype
    device: torch.device
    check: bool = True
    quick: bool = False
    seed: int = 0
    log: object = field(default=sys.stderr)  # None: silent (--quiet)
    progress: object = None  # the bar: None when `log` is a TTY, False never, True always
    on_row: object = None  # called with the result so far ("complete": False) after each row
    layouts: tuple = ("default",)  # adjugate layouts of the variants that read one


def variant_layouts(cfg, variant):
    return cfg.layouts if variant.layouts else (None,)


def concrete_layout(layout, backend):
    """"default": the layout `backend` runs when GROVE_ADJUGATE_LAYOUT is unset."""
    if layout != "default":
        return layout
    from grove_kernels import backends as registry
    return registry.layout(backend, None)


def _set_layout(layout, caller):
    """GROVE_ADJUGATE_LAYOUT = layout; None: the caller's value (unset when it had none)."""
    value = layout if layout is not None else caller
    if value is None:
        os.environ.pop(LAYOUT_VAR, None)
    else:
        os.environ[LAYOUT_VAR] = value


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _fmt_exc(exc):
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _check(cfg, out, ref):
    """(max rel err, verdict) of one untimed call's output(s) against the reference's:
    y for fwd, the gradient tuple for fwd+bwd (same order for every variant of a layer)."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    errs = [var.rel_err(o, r) for o, r in zip(outs, refs)]
    bad = [i for i, o in enumerate(outs) if not bool(torch.isfinite(o).all())]
    if bad:
        return None, "NONFINITE" + str(bad).replace(" ", "")
    err = max(errs)
    return err, "ok" if err <= var.tolerance(cfg.dtype) else "MISMATCH"


def count_cells(cfg):
    """Cells of the sweep, skipped ones included: the progress bar's total."""
    per_problem = sum((len(cfg.backends) if v.per_backend else 1) * len(variant_layouts(cfg, v))
                      for v in cfg.variants)
    return len(cfg.routings) * len(cfg.tokens) * len(cfg.passes) * per_problem


def run(cfg):
    """Runs the sweep; returns the JSON-ready result dict (rows, skipped, ceilings, ...)."""
    bar = ProgressBar(count_cells(cfg), cfg.log, enabled=cfg.progress)
    caller_layout = os.environ.get(LAYOUT_VAR)
    try:
        # Host-side id checks read tensors back each call: keep them out of the timings.
        with _validate.value_checks(False):
            return _run(cfg, bar, caller_layout)
    finally:  # also on Ctrl-C: a half-drawn bar would sit in front of the traceback
        _set_layout(None, caller_layout)
        bar.close()


def _run(cfg, bar, caller_layout):
    device, dtype, preset = cfg.device, cfg.dtype, cfg.preset
    timer = timing.make_timer(device, quick=cfg.quick)
    ceilings = timing.measure_ceilings(device, dtype, timer, quick=cfg.quick)
    bar.write(f"ceilings: copy {ceilings['copy_GBps']:.1f} GB/s, matmul "
              f"{ceilings['matmul_TFLOPs']:.3f} TFLOP/s ({ceilings['matmul_dtype']})")
    weights = var.make_weights(preset, device, dtype, seed=cfg.seed)
    elem = torch.empty(0, dtype=dtype).element_size()
    rows, skipped, seen_skips = [], [], set()
    commit = git_commit()

    def skip(variant, backend, pass_, reason, **where):
        key = (variant.name, backend, pass_, reason)
        if key not in seen_skips:
            seen_skips.add(key)
            skipped.append({"variant": variant.name, "backend": backend, "pass": pass_,
                            "reason": reason, **where})
            bar.write(f"skip {variant.name}/{backend} {pass_}: {reason}")

    for mode in cfg.routings:
        for T in cfg.tokens:
            logits = routing_mod.make_logits(mode, T, preset, seed=cfg.seed)
            topk_weights, topk_ids = routing_mod.route(logits, preset, device)
            gen = torch.Generator().manual_seed(cfg.seed + 7 * T + 1)
            x = torch.randn(T, preset.hidden, generator=gen).to(device, dtype)
            grad_out = torch.randn(T, preset.hidden, generator=gen).to(device, dtype)
            costs = {(layer, p): cost_model.layer_cost(topk_ids, preset, adjugates=layer == "grove",
                                                       pass_=p, elem_bytes=elem)
                     for layer in ("grove", "plain") for p in cfg.passes}
            refs = {}
            for pass_ in cfg.passes:
                for variant in cfg.variants:
                    backends = cfg.backends if variant.per_backend else (variant.backend,)
                    cells = list(dict.fromkeys((concrete_layout(lay, b), b)
                                               for lay in variant_layouts(cfg, variant)
                                               for b in backends))
                    for layout, backend in cells:
                        _set_layout(layout, caller_layout)
                        where = f"{variant.name}/{backend}" + (f" [{layout}]" if layout else "")
                        bar.step(f"{mode} T={T} {pass_} {where}")
                        reason = var.skip_reason(variant, device, dtype, pass_)
                        if reason:
                            skip(variant, backend, pass_, reason)
                            continue
                        fn = var.build(variant, backend, preset, weights, x, topk_weights,
                                       topk_ids, pass_, grad_out)
                        try:
                            out = fn()
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                        except Exception as exc:
                            skip(variant, backend, pass_, f"raised {_fmt_exc(exc)}",
                                 routing=mode, T=T)
                            continue
                        err, verdict = None, "unchecked"
                        if cfg.check:
                            key = (variant.layer, pass_)
                            if key not in refs:
                                try:
                                    _set_layout("sections", caller_layout)
                                    refs[key] = var.reference(variant.layer, preset, weights, x,
                                                              topk_weights, topk_ids, pass_,
                                                              grad_out)
                                    _set_layout(layout, caller_layout)
                                except Exception as exc:  # a broken reference is not the
                                    refs[key] = None      # variant's fault: time it anyway
                                    bar.write(f"reference {key} raised {_fmt_exc(exc)}")
                            if refs[key] is None:
                                verdict = "noref"
                            else:
                                err, verdict = _check(cfg, out, refs[key])
                        del out
                        try:
                            m = timer(fn)
                        except Exception as exc:
                            skip(variant, backend, pass_, f"timing raised {_fmt_exc(exc)}",
                                 routing=mode, T=T)
                            continue
                        c = costs[(variant.layer, pass_)]
                        row = {"preset": preset.name, "routing": mode, "T": T, "pass": pass_,
                               "variant": variant.name, "layout": layout, "backend": backend,
                               **cost_model.row_metrics(c, m.us, ceilings["copy_GBps"],
                                                        ceilings["matmul_TFLOPs"]),
                               "vs_baseline": None, "flops": c.flops, "bytes": c.bytes,
                               "timing": m.method, "rel_err": err, "check": verdict}
                        if m.method == "eager" and getattr(timer, "last_capture_error", None):
                            row["capture_error"] = timer.last_capture_error
                        rows.append(row)
                        bar.write(f"{mode:>8} T={T:<6} {pass_:<7} {where:>27} "
                                  f"{m.us:10.1f} us  {m.method:<5} {verdict}")
                        if cfg.on_row is not None:
                            cfg.on_row(_result(cfg, commit, ceilings, rows, skipped, False))
    return _result(cfg, commit, ceilings, rows, skipped, True)


def _result(cfg, commit, ceilings, rows, skipped, complete):
    """The JSON-ready record of the rows so far; `complete` is False until the sweep ends."""
    device, dtype, preset = cfg.device, cfg.dtype, cfg.preset
    _fill_baselines(rows, cfg.variants)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "ceilings": ceilings,
        "rows": list(rows),
        "skipped": list(skipped),
        "best_plain_training": best_plain_training(rows),
        "config": {
            "preset": preset.as_dict(),
            "tokens": list(cfg.tokens),
            "routing": list(cfg.routings),
            "backends": list(cfg.backends),
            "layouts": list(cfg.layouts),
            "variants": [v.name for v in cfg.variants],
            "passes": list(cfg.passes),
            "dtype": str(dtype).replace("torch.", ""),
            "device_type": device.type,
            "python": platform.python_version(),
            "grove_kernels_backends": gk.available_backends(),
            "anchors": anchors.versions(),
            # The process-wide kernel choices the rows ran under (environment or defaults).
            "cuda_fused_gemm1": gk.settings.fused_gemm1(train=False),
            "triton_schedule": os.environ.get("GROVE_TRITON_SCHEDULE", "persistent"),
            "triton_programs": os.environ.get("GROVE_TRITON_PROGRAMS"),
        },
    }


def _fill_baselines(rows, variants):
    """vs_baseline = us / us of the variant's baseline in the same (routing, T, pass, backend):
    the price of the adjugates (grove vs plain) at equal kernel quality."""
    by_name = {v.name: v for v in variants}
    index = {(r["routing"], r["T"], r["pass"], r["variant"], r["backend"], r.get("layout")): r["us"]
             for r in rows}
    for r in rows:
        v = by_name.get(r["variant"])
        if v is None or v.baseline is None:
            continue
        base_backend = r["backend"] if v.per_backend else by_name.get(v.baseline, v).backend
        where = (r["routing"], r["T"], r["pass"], v.baseline, base_backend)
        base = index.get(where + (r.get("layout"),)) or index.get(where + (None,))
        if base:
            r["vs_baseline"] = r["us"] / base


def best_plain_training(rows):
    """Per (routing, T, pass): the fastest plain training layer of this run (a variant of
    var.TRAINING_ANCHORS whose check is ok, or unchecked under --no-check) and the Grove
    layer's fastest backend beside it. grove_vs_best = grove us / best us: below 1 means the
    Grove layer, adjugates included, beats every plain training layer measured here."""
    best, grove = {}, {}
    for r in rows:
        if r.get("check") not in ("ok", "unchecked"):
            continue
        key = (r["routing"], r["T"], r["pass"])
        pick = best if r["variant"] in var.TRAINING_ANCHORS else (
            grove if r["variant"] == "grove" else None)
        if pick is not None and (key not in pick or r["us"] < pick[key]["us"]):
            pick[key] = r
    out = []
    for key, b in best.items():
        g = grove.get(key)
        out.append({"routing": key[0], "T": key[1], "pass": key[2], "variant": b["variant"],
                    "backend": b["backend"], "us": b["us"], "timing": b["timing"],
                    "grove_backend": g["backend"] if g else None,
                    "grove_layout": g.get("layout") if g else None,
                    "grove_us": g["us"] if g else None,
                    "grove_vs_best": g["us"] / b["us"] if g else None})
    return out
