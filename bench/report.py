"""Output of a sweep: the readable table (stdout), the JSON file, the CSV file.

The JSON is the record (docs/design.md §6): top level device, torch, commit, date, ceilings
{copy_GBps, matmul_TFLOPs, ...}, rows, plus skipped (variant, backend, pass, reason),
best_plain_training (per routing, T, pass: the fastest of the plain training layers
liger / grouped_mm-plain / scattermoe and grove's fastest backend beside it) and config
(with the anchors' versions).
Each row: preset, routing, T, pass, variant, backend, us, tflops, gbps, floor_us, pct_floor,
distinct_groups, and the extras vs_baseline, flops, bytes, timing, rel_err, check.
The CSV holds the rows alone, one per line, the same keys.

A recorded run (`--results-dir`, bench/results/README.md) is named `<device>_<date>`: the
device's slug (`device_slug`) and the run's UTC date, `.json` and `.png` side by side.
"""
import csv
import datetime
import json
import math
import os
import re

from bench.runner import EXTRA_KEYS, ROW_KEYS
from bench.variants import TRAINING_ANCHORS

_COLUMNS = (  # (header, row key, format)
    ("routing", "routing", "{}"),
    ("T", "T", "{}"),
    ("pass", "pass", "{}"),
    ("variant", "variant", "{}"),
    ("layout", "layout", "{}"),
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
    best = result.get("best_plain_training")
    if best:
        lines.append("best plain training layer (fastest of " + ", ".join(TRAINING_ANCHORS)
                     + " in this run) and grove's fastest backend:")
        for b in best:
            vs = (f"; grove/{b['grove_backend']} {b['grove_us']:.1f} us = "
                  f"{b['grove_vs_best']:.2f}x" if b["grove_us"] else "; no grove row")
            lines.append(f"  {b['routing']} T={b['T']} {b['pass']}: {b['variant']} "
                         f"{b['us']:.1f} us ({b['timing']}){vs}")
    for s in result.get("skipped", []):
        where = f" (routing {s['routing']}, T={s['T']})" if "T" in s else ""
        lines.append(f"skipped {s['variant']}/{s['backend']} {s['pass']}{where}: {s['reason']}")
    return "\n".join(lines)


def write_json(result, path):
    """Writes `result` to `path` whole or not at all (a temporary file, then a rename): the
    sweep rewrites it after every row, and a kill mid-write must leave the last good one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def write_csv(result, path):
    keys = list(ROW_KEYS) + list(EXTRA_KEYS)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])


_VENDORS = frozenset(("nvidia", "amd", "intel"))
_MEMORY = re.compile(r"^(\d+gb|hbm\d*e?|gddr\d*x?)$")  # "80GB", "HBM3", "HBM3e", "GDDR6X"


def device_slug(name):
    """The device part of a result file name: lower case, `-` joined; the vendor, memory size
    and type and anything in parentheses dropped, since they do not tell two boards apart that
    the model does not ("NVIDIA H100 80GB HBM3" -> "h100"; "NVIDIA H100 PCIe" -> "h100-pcie";
    "NVIDIA A100-SXM4-80GB" -> "a100-sxm4"; "cpu (x86_64, 2 threads)" -> "cpu"). Never `_`:
    that separates the device from the date."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"\([^)]*\)", " ", name.lower()))
    kept = [w for w in words if w and w not in _VENDORS and not _MEMORY.match(w)]
    return "-".join(kept) or "device"


def results_paths(result, directory):
    """(json path, png path) of `result` in `directory`: `<device>_<date>.json/.png`, the date
    the run's own (UTC, from result["date"]). A run on a day that already has a record gets
    `_2`, `_3`, ...: a recorded run is never overwritten."""
    date = datetime.date.fromisoformat(str(result["date"])[:10]).isoformat()
    base = f"{device_slug(result['device'])}_{date}"
    n = 1
    while True:
        stem = os.path.join(directory, base if n == 1 else f"{base}_{n}")
        if not (os.path.exists(stem + ".json") or os.path.exists(stem + ".png")):
            return stem + ".json", stem + ".png"
        n += 1
