"""The figure of a sweep: time and % of floor against T, one line per series.

A series is one (variant, backend, pass, routing) of the result's rows; its points are the T
the sweep ran. Two panels share the x axis (T, log scale):
    left   µs per call, log-log: the scaling of each variant (flat = launch-bound, slope 1 =
           proportional to T)
    right  % of the floor (docs/design.md §6: 100 · max(bytes / copy, FLOPs / matmul) / µs),
           linear:
           how far each variant is from what the device could do at that T
Colour = variant/backend, line style = pass, marker = routing; one legend per attribute, so
a full GPU sweep (~10 variant/backends × 2 passes × 3 routings) stays readable.

matplotlib is optional (the suite needs only torch): it is imported inside the functions that
draw, and `require_matplotlib` lets the CLI fail before a sweep rather than after it. Only the
object-oriented API is used (no pyplot): no GUI backend is selected, so it works headless.

`python -m bench.plot RESULT.json [OUT.png]` redraws the figure of a saved run.
"""
import json
import math
import os
import sys

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PASS_STYLES = {"fwd": "-", "fwd+bwd": "--"}
ROUTING_MARKERS = {"uniform": "o", "coactive": "s", "skewed": "^"}
_OTHER_MARKERS = ("D", "v", "P", "X")


def require_matplotlib(option="--plot"):
    """Imports matplotlib; raises RuntimeError naming `option` when it is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"{option} needs matplotlib, which is not importable here ({exc}); install it with "
            f"`pip install matplotlib` (the benchmark itself runs without it)") from None


def series(rows):
    """{(variant, backend, pass, routing): [(T, us, pct_floor), ...] sorted by T}, the keys in
    the order the sweep first produced them (the legend follows the run). A row's adjugate
    layout, where it has one, is part of its variant: "grove:folded"."""
    out = {}
    for r in rows:
        variant = f"{r['variant']}:{r['layout']}" if r.get("layout") else r["variant"]
        key = (variant, r["backend"], r["pass"], r["routing"])
        out.setdefault(key, []).append((r["T"], r.get("us"), r.get("pct_floor")))
    return {k: sorted(v) for k, v in out.items()}


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def _title(result):
    cfg = result.get("config", {})
    preset = cfg.get("preset", {}).get("name", "?")
    commit = (result.get("commit") or "no commit")[:10]
    c = result.get("ceilings", {})
    line1 = (f"{preset}, {cfg.get('dtype', '?')} on {result.get('device', '?')} | torch "
             f"{result.get('torch', '?')} | {commit} | {str(result.get('date', '?'))[:10]}")
    line2 = (f"ceilings: copy {c.get('copy_GBps', float('nan')):.1f} GB/s, matmul "
             f"{c.get('matmul_TFLOPs', float('nan')):.3f} TFLOP/s")
    return f"{line1}\n{line2}"


def _style_maps(keys):
    """Colour per variant/backend, marker per routing, in order of appearance."""
    from matplotlib import colormaps

    combos = list(dict.fromkeys((v, b) for v, b, _, _ in keys))
    cmap = colormaps["tab10" if len(combos) <= 10 else "tab20"]
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(combos)}
    routings = list(dict.fromkeys(r for _, _, _, r in keys))
    spare = iter(_OTHER_MARKERS * len(routings))
    markers = {r: ROUTING_MARKERS.get(r) or next(spare) for r in routings}
    return colors, markers


def _plain_log_labels(ax):
    """µs as plain numbers (500, not 5×10²); the 2-3-5 minor ticks labelled only when the
    y axis spans under two decades (a short CPU sweep), where majors alone leave one or none."""
    from matplotlib.ticker import FuncFormatter

    def minor(value, _pos):
        lo, hi = ax.get_ylim()
        if hi / lo > 100:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
        return f"{value:g}" if mantissa in (2, 3, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def build_figure(result):
    """The matplotlib Figure of `result` (the runner's dict or its JSON)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FixedFormatter, NullLocator

    data = series(result.get("rows", []))
    fig = Figure(figsize=(13, 5.2), dpi=110)
    ax_us, ax_pct = fig.subplots(1, 2, sharex=True)
    fig.subplots_adjust(left=0.075, right=0.80, top=0.84, bottom=0.11, wspace=0.24)
    fig.suptitle(_title(result), fontsize=9)
    ax_us.set_title("time per call (median)", fontsize=10)
    ax_pct.set_title("% of floor = 100 · max(bytes/copy, FLOPs/matmul) / time", fontsize=10)
    ax_us.set_ylabel("µs")
    ax_pct.set_ylabel("% of floor")
    for ax in (ax_us, ax_pct):
        ax.set_xlabel("T (tokens)")
        ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.3)
    ax_us.set_yscale("log")
    ax_us.grid(True, which="minor", axis="y", alpha=0.1)

    if not data:
        for ax in (ax_us, ax_pct):
            ax.text(0.5, 0.5, "no rows in this result", ha="center", va="center",
                    transform=ax.transAxes)
        return fig

    colors, markers = _style_maps(data)
    for (variant, backend, pass_, routing), points in data.items():
        style = dict(color=colors[(variant, backend)], linestyle=PASS_STYLES.get(pass_, ":"),
                     marker=markers[routing], markersize=4, linewidth=1.4,
                     label=f"{variant}/{backend} {pass_} {routing}")
        for ax, idx in ((ax_us, 1), (ax_pct, 2)):
            pts = [(p[0], p[idx]) for p in points if _finite(p[idx]) and p[idx] > 0]
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], **style)
    ax_pct.set_ylim(bottom=0)
    _plain_log_labels(ax_us)

    # Ticks at the T of the sweep, written as integers: 10^2-style labels hide 64 or 4096.
    tokens = sorted({p[0] for pts in data.values() for p in pts})
    ax_pct.xaxis.set_major_locator(FixedLocator(tokens))
    ax_pct.xaxis.set_major_formatter(FixedFormatter([str(t) for t in tokens]))
    ax_pct.xaxis.set_minor_locator(NullLocator())  # shared with ax_us through sharex

    def proxy(**kw):
        return Line2D([], [], **{"color": "0.3", "linestyle": "-", **kw})

    # One legend, three sections (a bold header entry with an empty handle before each):
    # separate fig.legend calls would need the drawn size of each to stack them.
    sections = (
        ("variant/backend", [(proxy(color=c, linewidth=2.5), f"{v}/{b}")
                             for (v, b), c in colors.items()]),
        ("pass", [(proxy(linestyle=PASS_STYLES.get(p, ":")), p)
                  for p in dict.fromkeys(k[2] for k in data)]),
        ("routing", [(proxy(linestyle="none", marker=m), r) for r, m in markers.items()]),
    )
    handles, labels, headers = [], [], []
    for title, entries in sections:
        headers.append(len(labels))
        handles.append(proxy(linestyle="none"))
        labels.append(title)
        for h, text in entries:
            handles.append(h)
            labels.append(text)
    leg = fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.815, 0.86),
                     fontsize=8, frameon=False, handlelength=2.6)
    for i in headers:
        leg.get_texts()[i].set_fontweight("bold")
    return fig


def write_plot(result, path):
    """Writes the figure of `result` to `path` as a PNG."""
    require_matplotlib()
    build_figure(result).savefig(path, format="png")


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or args[0] in ("-h", "--help"):
        print("usage: python -m bench.plot RESULT.json [OUT.png]  (default OUT: RESULT.png)",
              file=sys.stderr)
        return 2
    src = args[0]
    dst = args[1] if len(args) == 2 else os.path.splitext(src)[0] + ".png"
    try:
        require_matplotlib("bench.plot")
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    with open(src) as f:
        write_plot(json.load(f), dst)
    print(f"wrote {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
