"""`python -m grove_kernels.tools.fill_auto_table RECORD.json ...`: auto's tables from bench records.

    bench records (python -m bench --json): rows {T, pass fwd | fwd+bwd, variant grove | plain,
        backend, us, check, routing} under a device, a dtype and a preset (the layer shape)
      -> per (device, dtype, shape, pass): the fastest backend per measured T
      -> buckets [[largest T, backend], ..., [null, backend]], bounds at the geometric mean of
         neighbouring T where the winner changes
      -> grove_kernels/auto_tables/device_name=<device>.json (one file per device, rewritten)

Only rows checked correct (`check` ok), uniform routing, and the package's own layers (`grove`:
Ia of the preset; `plain`: Ia = 0) count, each backend's on the adjugate layout it runs when
GROVE_ADJUGATE_LAYOUT is unset (its `default_layout`): `auto` picks a backend, not a layout. `fwd` rows fill the inference pass, `fwd+bwd` rows
the training pass. Records of an opt-in configuration (`config.cuda_fuse_swiglu` true, or a
file name ending in `_fused.json`) are left out: `auto` does not switch options on.
"""
import argparse
import json
import math
import os
import sys
from collections import defaultdict

from .. import backends as auto_table

_PASS = {"fwd": "inference", "fwd+bwd": "training"}


def _opt_in(path, record):
    return bool(record.get("config", {}).get("cuda_fuse_swiglu")) or path.endswith("_fused.json")


def _default_layout(row):
    """The row ran its backend's default layout (rows without a layout: plain MoE, older records)."""
    layout = row.get("layout")
    backend = auto_table.BACKENDS.get(row["backend"])
    return layout is None or (backend is not None and layout == backend.default_layout)


def collect(paths, log=print):
    """{(device, dtype, shape key, pass): {T: {backend: us}}} and the sources per device."""
    timings = defaultdict(lambda: defaultdict(dict))
    sources = defaultdict(list)
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        if _opt_in(path, record):
            log(f"{path}: an opt-in configuration, left out")
            continue
        config = record["config"]
        preset = config["preset"]
        device, dtype = record["device"], config["dtype"]
        used = 0
        for row in record["rows"]:
            if (row.get("check") != "ok" or row.get("routing") != "uniform"
                    or row["variant"] not in ("grove", "plain") or row["pass"] not in _PASS
                    or not _default_layout(row)):
                continue
            Ia = preset["adj_intermediate"] if row["variant"] == "grove" else 0
            shape = auto_table.shape_of(preset["hidden"], preset["intermediate"], Ia,
                                        preset["experts"], preset["top_k"])
            key = (device, dtype, json.dumps(shape, sort_keys=True), _PASS[row["pass"]])
            best = timings[key][row["T"]].get(row["backend"])
            timings[key][row["T"]][row["backend"]] = min(row["us"], best or math.inf)
            used += 1
        if used:
            sources[device].append(f"{os.path.basename(path)} (commit "
                                   f"{record.get('commit', '?')[:7]}, {record.get('date', '?')})")
    return timings, sources


def buckets(measured):
    """[[largest T, backend], ..., [None, backend]] from {T: {backend: us}}."""
    winners = [(T, min(by, key=by.get)) for T, by in sorted(measured.items())]
    out = []
    for (T, name), nxt in zip(winners, winners[1:] + [None]):
        if nxt is not None and nxt[1] == name:
            continue
        out.append([None if nxt is None else int(round(math.sqrt(T * nxt[0]))), name])
    return out


def tables(timings, sources):
    """{device: the JSON document of its file}."""
    docs = {}
    for (device, dtype, shape, pass_), measured in sorted(timings.items()):
        doc = docs.setdefault(device, {"device": device, "sources": sources[device],
                                       "tables": []})
        doc["tables"].append({
            "dtype": dtype, "shape": json.loads(shape), "pass": pass_,
            "buckets": buckets(measured),
            "measured": {str(T): {b: round(us, 1) for b, us in sorted(by.items())}
                         for T, by in sorted(measured.items())},
        })
    return docs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", help="bench JSON records")
    parser.add_argument("--out-dir", default=auto_table.TABLES_DIR)
    args = parser.parse_args(argv)
    docs = tables(*collect(args.records))
    os.makedirs(args.out_dir, exist_ok=True)
    for device, doc in docs.items():
        path = os.path.join(args.out_dir, auto_table.file_name(device))
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        for t in doc["tables"]:
            print(f"{path}: {t['dtype']} {t['shape']} {t['pass']}: {t['buckets']}")
    return 0 if docs else 1


if __name__ == "__main__":
    sys.exit(main())
