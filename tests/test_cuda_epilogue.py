"""GEMM-1's fused SwiGLU epilogue (csrc/gemm/swiglu_epilogue.cuh) checked on the CPU machine.

tests/cuda/swiglu_epilogue_check.cu instantiates every fused configuration's CUTLASS kernel
types and runs the epilogue's per-tile operator on the host for every MMA thread: it checks the
gate/up pairing the epilogue assumes of the wgmma accumulator fragment, every output value bit
for bit, and that nothing outside D is written. The GPU run of the same kernels is in
tests/test_cuda_ops_gpu.py.
"""
import os
import subprocess

import pytest

from test_cuda_build import ROOT, build_cuda

pytestmark = pytest.mark.skipif(bool(build_cuda.missing_prerequisites()),
                                reason="; ".join(build_cuda.missing_prerequisites()) or "ok")


def test_swiglu_epilogue_on_the_host(tmp_path):
    src = os.path.join(ROOT, "tests", "cuda", "swiglu_epilogue_check.cu")
    exe = str(tmp_path / "swiglu_epilogue_check")
    includes = [os.path.join(build_cuda.CSRC, "include"), os.path.join(build_cuda.CSRC, "gemm")]
    flags = [f for f in build_cuda.NVCC_FLAGS if f not in ("-Xcompiler", "-fPIC")]
    cmd = ([build_cuda.find_nvcc()] + flags
           + [f"-I{d}" for d in includes + build_cuda.cutlass_include_dirs()] + [src, "-o", exe])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout[-4000:]
    for config in ("bf16_tn_swiglu_coop_128x256_c11", "bf16_tn_swiglu_pingpong_64x128_c11",
                   "fp16_tn_swiglu_coop_128x256_c11", "fp16_tn_swiglu_pingpong_64x128_c11"):
        assert f"{config}: " in run.stdout
