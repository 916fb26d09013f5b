"""Output of a sweep: the readable table (stdout), the JSON file, the CSV file.

The JSON is the record (DESIGN §6): top level device, torch, commit, date, ceilings
{copy_GBps, matmul_TFLOPs, ...}, rows, plus skipped (variant, backend, pass, reason) and config.
Each row: preset, routing, T, pass, variant, backend, us, tflops, gbps, floor_us, pct_floor,
distinct_groups, and the extras vs_baseline, flops, bytes, timing, rel_err, check.
The CSV holds the rows alone, one per line, the same keys.
"""
import csv
import json
import math

from bench.runner import EXTRA_KEYS, ROW_KEYS

_COLUMNS = (  # (header, row key, format)
    ("routing", "routing", "{}"),
    ("T", "T", "{}"),
    ("pass", "pass", "{}"),
    ("variant", "variant", "{}"),
    ("backend", "backend", "{}"),
    ("us", "us", "{:.1f}"),
    ("TFLOP/s", "tflops", "{:.3g}"),
    ("GB/s", "gbps", "{:.4g}"),
    ("floor us", "floor_us", "{:.1f}"),
    ("%floor", "pct_floor", "{:.1f}"),
    ("d", "distinct_groups", "{:.2f}"),
    ("x base", "vs_baseline", "{:.2f}"),
    ("timing", "timing", "{}"),
    ("check", "check", "{}"),
    ("err", "rel_err", "{:.1e}"),
)


def _cell(fmt, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(result):
    """Rows grouped by (routing, T, pass), a blank line between groups; then ceilings/skips."""
    lines = []
    head = [h for h, _, _ in _COLUMNS]
    body, last = [], None
    for r in result["rows"]:
        group = (r["routing"], r["T"], r["pass"])
        if last is not None and group != last:
            body.append(None)
        last = group
        body.append([_cell(f, r.get(k)) for _, k, f in _COLUMNS])
    widths = [max([len(h)] + [len(b[i]) for b in body if b]) for i, h in enumerate(head)]
    numeric = {i for i, (_, k, _) in enumerate(_COLUMNS)
               if k in ("T", "us", "tflops", "gbps", "floor_us", "pct_floor", "distinct_groups",
                        "vs_baseline")}

    def fmt_line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    cfg = result.get("config", {})
    c = result["ceilings"]
    lines.append(f"device: {result['device']} | torch {result['torch']} | commit "
                 f"{result['commit']} | {result['date']}")
    if cfg:
        p = cfg["preset"]
        lines.append(f"preset {p['name']}: H={p['hidden']} E={p['experts']} k={p['top_k']} "
                     f"I={p['intermediate']} S={p['group_size']} Ia={p['adj_intermediate']} "
                     f"λ={p['adj_scale']} | dtype {cfg['dtype']}")
    lines.append(f"ceilings: copy {c['copy_GBps']:.1f} GB/s, matmul {c['matmul_TFLOPs']:.3f} "
                 f"TFLOP/s ({c.get('matmul_dtype', '?')}); floor = max(bytes/copy, FLOPs/matmul), "
                 f"%floor = 100·floor/us; x base = us / baseline us (grove vs plain, same backend)")
    lines.append(fmt_line(head))
    lines.append(fmt_line(["-" * w for w in widths]))
    lines.extend("" if b is None else fmt_line(b) for b in body)
    for s in result.get("skipped", []):
        where = f" (routing {s['routing']}, T={s['T']})" if "T" in s else ""
        lines.append(f"skipped {s['variant']}/{s['backend']} {s['pass']}{where}: {s['reason']}")
    return "\n".join(lines)


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1, allow_nan=True)
        f.write("\n")


def write_csv(result, path):
    keys = list(ROW_KEYS) + list(EXTRA_KEYS)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
