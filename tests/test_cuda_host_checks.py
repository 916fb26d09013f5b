"""CUDA code of csrc/ that runs on the host too, checked on the CPU machine (nvcc, no GPU).

    cuda/swiglu_epilogue_check.cu     GEMM-1's fused SwiGLU epilogue (gemm/swiglu_epilogue.cuh):
                                      every fused kernel of the table, its CUTLASS types, both
                                      phases run as the two consumer warpgroups do (stage to
                                      the shared-memory slab for every MMA thread, then the
                                      16-byte stores for every thread): the gate/up pairing it
                                      assumes of the wgmma fragment, each slab entry staged
                                      once by its own warpgroup, each output written once and
                                      bit for bit, nothing outside D, no bank conflicts
    cuda/grouped_gemm_args_check.cu   gemm/grouped_gemm_args.cu: the argument checks of every
                                      layout and the per-problem shapes / addresses / leading
                                      dims the fill kernel writes (same function, run on the
                                      host), clamping included, problems sharing one B
                                      (b_shared: the folded adjugates)
    cuda/grouped_layouts_check.cu     the stride types CUTLASS derives for A, B and D of every
                                      kernel of the table, filled from one int64 as the device
                                      does: every element's offset matches the torch tensors of
                                      the contract
    cuda/folded_rows_check.cu         folded.cu's row walk: each real row's expert (binary
                                      search of the offsets) and whether it leads its group,
                                      against a linear scan, empty experts, padding and
                                      corrupt offsets included
The kernels come from GROVE_FOR_EACH_GEMM_KERNEL (csrc/generate_kernels.py's table), so the
checks cover exactly what is built.

The GPU runs of the same code are in tests/test_cuda_ops_gpu.py.
"""
import os
import subprocess

import pytest

from grove_kernels.cuda.gemm_kernels import GEMM_KERNELS, SWIGLU
from test_cuda_build import ROOT, build_cuda

pytestmark = pytest.mark.skipif(bool(build_cuda.missing_prerequisites()),
                                reason="; ".join(build_cuda.missing_prerequisites()) or "ok")


def _build_and_run(name, tmp_path):
    src = os.path.join(ROOT, "tests", "cuda", name + ".cu")
    exe = str(tmp_path / name)
    includes = [os.path.join(build_cuda.CSRC, "include"), os.path.join(build_cuda.CSRC, "gemm")]
    flags = [f for f in build_cuda.NVCC_FLAGS if f not in ("-Xcompiler", "-fPIC")]
    cmd = ([build_cuda.find_nvcc()] + flags
           + [f"-I{d}" for d in includes + build_cuda.cutlass_include_dirs()] + [src, "-o", exe])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout[-4000:]
    return run.stdout


def _checked(out):
    """Names of the kernels a check program reports, in order."""
    return [line.split(":", 1)[0] for line in out.splitlines() if line.startswith("sm90_")]


def test_swiglu_epilogue_on_the_host(tmp_path):
    out = _build_and_run("swiglu_epilogue_check", tmp_path)
    fused = [k.name for k in GEMM_KERNELS if k.epilogue == SWIGLU]
    assert fused and _checked(out) == fused


def test_grouped_gemm_args_on_the_host(tmp_path):
    _build_and_run("grouped_gemm_args_check", tmp_path)


def test_grouped_layouts_on_the_host(tmp_path):
    out = _build_and_run("grouped_layouts_check", tmp_path)
    assert _checked(out) == [k.name for k in GEMM_KERNELS]


def test_folded_rows_on_the_host(tmp_path):
    _build_and_run("folded_rows_check", tmp_path)
