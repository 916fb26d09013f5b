"""grove-kernels microbenchmark suite (docs/design.md §6).

Run as `python -m bench` from the repository root (see `python -m bench --help`), or as a
pytest-benchmark suite with `pytest bench --benchmark-only` (`--benchmark-disable` turns the
same file into a quick correctness test).

Dataflow of one row: preset (H, E, k, I, S, Ia, λ) + T + routing mode
    -> router logits [T, E] -> gk.grove_topk -> topk_weights [T, k] fp32, topk_ids [T, k] int32
    -> cost model (FLOPs, bytes, d_t) on the host, once
    -> each variant's forward (y [T, H]) or forward + backward (dX [T, H], dW1 [E, 2I, H], ...)
       timed outside of routing -> µs, TFLOP/s, GB/s, floor, % of floor.

Modules: presets (shapes), routing (logit generators), cost (FLOP/byte model), timing
(timers + ceilings), grouped_mm_layer (the torch._grouped_mm Grove and plain layers in the
usual form), grouped_mm_index_add (the bench's first such layer, kept as a variant), anchors
(Liger-Kernel's fused MoE and ScatterMoE as the bench calls them), variants (what is timed),
runner (the sweep), progress (stderr lines + progress bar), report (table, JSON, CSV, result
file names), plot (the PNG; matplotlib, optional; `python -m bench.plot RESULT.json` redraws a
saved run), cli (argparse), ep_traffic (`--ep-world-size`: bytes an expert-parallel layer
sends), traffic (`--traffic`: the modelled HBM bytes and FLOPs of every launch of the triton and
cuda backends, per adjugate layout, from grove_kernels/traffic.py; no GPU); conftest +
test_bench_layer (the pytest-benchmark suite), test_grouped_mm_layer and test_anchors (those
layers against the float64 oracle).
tests/test_bench_smoke.py runs `--smoke`. Recorded runs live in bench/results/.
"""
