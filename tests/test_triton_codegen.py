"""The Triton GEMMs compile for sm_90 on a CPU machine, use Hopper tensor cores (wgmma) and
16-byte pipelined loads, and fit in an H100's shared memory (grove_kernels.triton.codegen_check,
run in a subprocess because it needs real JIT functions, not the interpreter's)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

H100_SHARED_PER_BLOCK = 232448


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "grove_kernels.triton.codegen_check", "--json"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["kernel"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}


KERNELS = ["gemm1_swiglu", "gemm1_swiglu+h", "gemm2", "dgemm2_swiglu_bwd", "dgemm1",
           "wgrad_dw2", "wgrad_dw1"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_uses_wgmma_and_vector_loads(report, kernel):
    r = report[kernel]
    assert r["wgmma"] > 0, r
    assert r["cp16"] > 0, r  # lost stride specializations compile to no cp.async at all
    assert r["shared_bytes"] <= H100_SHARED_PER_BLOCK, r


def test_heuristic_configs_fit_in_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "grove_kernels.triton.codegen_check",
                          "--heuristic"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 4 * 2 * 3
    too_big = [r for r in rows if r["shared_bytes"] > H100_SHARED_PER_BLOCK]
    assert not too_big, too_big
