"""`python -m bench --ep-world-size P`: bytes an expert-parallel Grove layer moves per token, for
a simulated world size (no processes, no timing: counted from the routing tensors).

    routing (bench/routing.py: uniform | coactive | skewed) -> topk_ids [T, k] (global)
    source rank of token t: contiguous blocks, t·P // T; expert e lives on rank e // (E/P)
    (G/P whole groups per rank, as grove_kernels.distributed shards them)
    -> per scheme: rows sent to OTHER ranks (a row to the token's own rank is a local copy),
       x bytes (rows · H · element size), metadata bytes (routing ids + weights, int32 + fp32),
       combine bytes (the partial outputs coming back: rows · H · element size)

Schemes:
  token-once   grove_kernels.distributed.dispatch_grove_experts: a token goes once to each rank
               holding one of its experts, with its k ids and k weights (other ranks' slots are
               masked by the receiver's expert_map); adjugates computed there, once per group.
  per-expert   fused-moe expert parallel: a token copy per selected expert (k rows), one id and
               one weight each; the adjugates would need more (not counted: a lower bound).
  released     the released Grove scheme: the per-expert dispatch, then the adjugates as a
               second dispatch with ids // S (k more rows per token, shared groups included).

Outputs: a table on stdout (bytes per token, averaged over all T tokens of all ranks) and,
with --json, the rows as JSON. d is the mean distinct groups per token, ranks the mean ranks a
token needs (token-once rows per token, self included).
"""
import json
import sys

import torch

from bench import presets
from bench.routing import MODES, make_logits, route

SCHEMES = ("token-once", "per-expert", "released")
ID_BYTES = WEIGHT_BYTES = 4  # int32 ids, fp32 routing weights (what grove_topk returns)
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def source_ranks(num_tokens, world_size):
    """[T] int64: the rank that owns token t (contiguous blocks)."""
    return torch.arange(num_tokens) * world_size // max(num_tokens, 1)


def traffic(topk_ids, source_rank, world_size, num_experts, hidden, elem_bytes,
            slot_bytes=ID_BYTES + WEIGHT_BYTES):
    """{scheme: {rows, remote_rows, x_bytes, meta_bytes, combine_bytes}} for routing topk_ids
    [T, k] (global ids) and the owner rank of each token source_rank [T]; slot_bytes: an id
    and a weight (16 for fp64 routing weights, which carry fp64-wide ids)."""
    if num_experts % world_size:
        raise ValueError(f"world_size: {world_size} does not divide the {num_experts} experts")
    ids = topk_ids.long()
    T, k = ids.shape
    dest = ids // (num_experts // world_size)  # [T, k]
    src = source_rank.long()[:, None]
    need = torch.zeros(T, world_size, dtype=torch.bool).scatter_(1, dest, True)  # [T, P]
    once_remote = int((need & (torch.arange(world_size) != src)).sum())
    slot_remote = int((dest != src).sum())
    row_x = hidden * elem_bytes
    out = {
        "token-once": dict(rows=int(need.sum()), remote_rows=once_remote,
                           meta_row_bytes=k * slot_bytes),
        "per-expert": dict(rows=T * k, remote_rows=slot_remote, meta_row_bytes=slot_bytes),
        "released": dict(rows=2 * T * k, remote_rows=2 * slot_remote, meta_row_bytes=slot_bytes),
    }
    for c in out.values():
        c["x_bytes"] = c["remote_rows"] * row_x
        c["meta_bytes"] = c["remote_rows"] * c.pop("meta_row_bytes")
        c["combine_bytes"] = c["remote_rows"] * row_x
    return out


def simulate(preset, tokens, routings, world_sizes, elem_bytes, seed=0):
    """Rows of the report: one per (routing, T, P, scheme); byte counts are per token."""
    rows = []
    for mode in routings:
        for T in tokens:
            _, ids = route(make_logits(mode, T, preset, seed), preset, "cpu")
            groups = ids.long() // preset.group_size
            d = sum(len(set(g)) for g in groups.tolist()) / T
            for P in world_sizes:
                counts = traffic(ids, source_ranks(T, P), P, preset.experts, preset.hidden,
                                 elem_bytes)
                once = counts["token-once"]
                once_total = once["x_bytes"] + once["meta_bytes"] + once["combine_bytes"]
                for scheme in SCHEMES:
                    c = counts[scheme]
                    total = c["x_bytes"] + c["meta_bytes"] + c["combine_bytes"]
                    rows.append(dict(
                        routing=mode, T=T, world_size=P, scheme=scheme,
                        rows_per_token=c["rows"] / T, remote_rows_per_token=c["remote_rows"] / T,
                        x_bytes_per_token=c["x_bytes"] / T,
                        meta_bytes_per_token=c["meta_bytes"] / T,
                        combine_bytes_per_token=c["combine_bytes"] / T,
                        total_bytes_per_token=total / T,
                        vs_token_once=total / once_total if once_total else None,
                        distinct_groups=d, ranks_per_token=once["rows"] / T))
    return rows


def format_table(rows):
    head = (f"{'routing':<9} {'T':>6} {'P':>3} {'scheme':<11} {'d':>5} {'ranks':>5} "
            f"{'rows/tok':>8} {'x B/tok':>9} {'meta B/tok':>10} {'comb B/tok':>10} "
            f"{'total B/tok':>11} {'/once':>6}")
    lines = ["bytes sent to other ranks per token (dispatch + combine)", head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['vs_token_once']:.2f}" if r["vs_token_once"] is not None else "-"
        lines.append(
            f"{r['routing']:<9} {r['T']:>6} {r['world_size']:>3} {r['scheme']:<11} "
            f"{r['distinct_groups']:>5.2f} {r['ranks_per_token']:>5.2f} "
            f"{r['remote_rows_per_token']:>8.2f} {r['x_bytes_per_token']:>9.0f} "
            f"{r['meta_bytes_per_token']:>10.0f} {r['combine_bytes_per_token']:>10.0f} "
            f"{r['total_bytes_per_token']:>11.0f} {ratio:>6}")
    return "\n".join(lines)


_UNUSED = ("csv", "plot", "results_dir", "backends", "variants", "device")


def main(args, parser):
    """The --ep-world-size run of `python -m bench` (argparse namespace from bench.cli)."""
    for name in _UNUSED:
        if getattr(args, name) not in (None, False):
            parser.error(f"--{name.replace('_', '-')}: not used with --ep-world-size")
    preset = presets.get_preset(args.preset or (presets.SMOKE_PRESET if args.smoke
                                                else "grove-33b"))
    bad = [P for P in args.ep_world_size if preset.groups % P]
    if bad:
        parser.error(f"--ep-world-size: {bad} do not divide the {preset.groups} groups of "
                     f"{preset.name} (groups are sharded whole)")
    bad = [m for m in args.routing if m not in MODES]
    if bad:
        parser.error(f"--routing: unknown {bad}; choose from {MODES}")
    dtype = args.dtype or "bf16"
    tokens = args.tokens or (presets.SMOKE_TOKENS if args.smoke else presets.GPU_TOKENS)
    rows = simulate(preset, tokens, args.routing, args.ep_world_size, ELEM_BYTES[dtype],
                    args.seed)
    if args.json:
        result = {"kind": "ep-traffic", "preset": preset.as_dict(), "dtype": dtype,
                  "world_sizes": list(args.ep_world_size), "seed": args.seed, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(format_table(rows))
    sys.stdout.flush()
    if args.json and not args.quiet:
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
