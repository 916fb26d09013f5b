"""Measured choices of `auto`: the fastest backend per (device, dtype, token count).

Each entry lists (largest T, backend) buckets in increasing T. A bucket's bound is the
geometric mean of the two measured token counts it separates; beyond the table, the last
bucket holds. Devices and dtypes not listed fall back to the rule in backends.py (cuda where
it supports the call, else triton).

H200 (NVIDIA H200, 2026-11-28, commit 57a9e80, grove-33b bf16, uniform routing, whole forward
call, CUDA-graph replay with L2 flushed; bench/results/h200_2026-11-28.md):
    T        1     64     256    1024   4096   16384
    cuda     81.8  382.6  405.8  507.0  997.8  3372.4   µs
    triton   86.0  364.9  470.6  562.3  1349.8 4683.8   µs
"""
import torch

TABLE = {
    ("NVIDIA H200", torch.bfloat16): ((8, "cuda"), (128, "triton"), (None, "cuda")),
}


def lookup(device_name, dtype, num_tokens):
    """The measured backend for this call, or None when the device / dtype is not listed."""
    buckets = TABLE.get((device_name, dtype))
    if buckets is None:
        return None
    for bound, name in buckets:
        if bound is None or num_tokens <= bound:
            return name
    return buckets[-1][1]
