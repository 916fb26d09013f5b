"""Timers and hardware ceilings.

GPU: the call is captured once in a CUDA graph and the graph is replayed; the median over
many replays comes from triton.testing.do_bench (which zeroes a 256 MB buffer before each
replay, so L2 starts cold, as it does for an MoE layer between two attention blocks). Without
Triton the same protocol runs on torch.cuda.Event pairs with our own L2-flush buffer. A call
that cannot be captured (a host sync inside it) is timed eagerly under the same protocol and
its row says so (`timing: "eager"`): its number then includes launch overhead.
CPU: wall clock (time.perf_counter) per call after warm-up; median.

Ceilings, measured in the same process as the rows:
    copy_GBps     a device-to-device copy of a large tensor, bytes read + written / s
    matmul_TFLOPs a large square matmul in the run's dtype (bf16 on GPU by default, fp32 on CPU)
"""
import statistics
import time
from dataclasses import dataclass

import torch

try:
    import triton.testing as _tt
except Exception:  # ImportError, or a Triton whose driver cannot initialise here
    _tt = None

L2_FLUSH_BYTES = 256 * 1024 * 1024  # > L2 of every current GPU (H100 50 MB, H200 60 MB)


@dataclass
class Measurement:
    us: float
    method: str  # "graph", "eager", or "wall" (CPU)


class CpuTimer:
    """Median wall-clock µs of `fn()` after warm-up, sized to a time budget per measurement."""

    def __init__(self, budget_s=0.5, min_reps=5, max_reps=2000):
        self.budget_s, self.min_reps, self.max_reps = budget_s, min_reps, max_reps

    def __call__(self, fn):
        fn()  # first call pays one-off costs (allocator growth, lazy imports, kernel selection)
        t0 = time.perf_counter()
        fn()
        est = max(time.perf_counter() - t0, 1e-7)
        reps = int(min(self.max_reps, max(self.min_reps, self.budget_s / est)))
        for _ in range(min(reps // 10, 20)):  # steady state before sampling
            fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return Measurement(statistics.median(samples) * 1e6, "wall")


def _capture(fn):
    """A CUDA graph of one call of fn. Warm-up runs on a side stream first, as PyTorch asks,
    so lazy initialisation (cuBLAS handles, Triton compiles, autotuning) stays out of it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


class GpuTimer:
    """Median µs of fn on the GPU: CUDA-graph replay with L2 flushed (eager if uncapturable)."""

    def __init__(self, warmup_ms=25, rep_ms=100, use_graphs=True):
        self.warmup_ms, self.rep_ms, self.use_graphs = warmup_ms, rep_ms, use_graphs
        self._flush = None
        self.last_capture_error = None

    def _median_ms(self, run):
        if _tt is not None:
            return _tt.do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        if self._flush is None:
            self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end), 1e-3)
        for _ in range(max(1, int(self.warmup_ms / est))):
            run()
        n = int(min(10000, max(10, self.rep_ms / est)))
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(n)
        ]
        for s, e in events:
            self._flush.zero_()  # evicts L2 between replays, as do_bench does
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def __call__(self, fn):
        self.last_capture_error = None
        if self.use_graphs:
            try:
                graph = _capture(fn)
            except Exception as exc:  # a host sync or an uncapturable op inside fn
                self.last_capture_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                torch.cuda.synchronize()
            else:
                try:
                    return Measurement(self._median_ms(graph.replay) * 1e3, "graph")
                finally:
                    del graph  # its private memory pool goes back before the next variant
        fn()
        torch.cuda.synchronize()
        return Measurement(self._median_ms(fn) * 1e3, "eager")


def make_timer(device, quick=False):
    if device.type == "cuda":
        return GpuTimer(warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)
    return CpuTimer(budget_s=0.08 if quick else 0.5, min_reps=5)


def _copy_us(device, nbytes, timer):
    """Best µs to copy nbytes on device (the buffers are freed on return)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return min(timer(lambda: dst.copy_(src)).us, timer(lambda: torch.mul(src, 1.0, out=dst)).us)


def measure_ceilings(device, dtype, timer, quick=False):
    """{copy_GBps, matmul_TFLOPs, matmul_dtype, ...}: the two roofs of the floor model.

    Each roof is the best of a few tries: it stands for what the device can do, and a try can
    only fall short of that. Copy tries include an elementwise kernel because inside a CUDA
    graph `copy_` becomes a memcpy node, measured at 2.4 TB/s on an H100 against 3.0 TB/s for
    a copy kernel (eager copy_ or `mul(src, 1, out=dst)`)."""
    gpu = device.type == "cuda"
    copy_bytes = (1024 if gpu else (32 if quick else 128)) * 1024 * 1024
    copy_us = _copy_us(device, copy_bytes, timer)

    n = 8192 if gpu else (512 if quick else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    # Random data: zeros run faster on tensor cores (less switching power) and flatter a ceiling.
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    mm_us = min(timer(lambda: torch.mm(a, b)).us for _ in range(2))
    return {
        "copy_GBps": 2.0 * copy_bytes / (copy_us * 1e3),
        "matmul_TFLOPs": 2.0 * n**3 / (mm_us * 1e6),
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "copy_bytes": copy_bytes,
        "matmul_n": n,
    }
