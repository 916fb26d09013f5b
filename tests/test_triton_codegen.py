"""The Triton GEMMs compile for sm_90 on a CPU machine, use Hopper tensor cores (wgmma) and
16-byte pipelined loads, fit in an H100's shared memory and in its register file, and form
every row x stride pointer offset in 64 bits (grove_kernels.triton.codegen_check, run in a
subprocess because it needs real JIT functions, not the interpreter's)."""
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


_FOLDED_GEMMS = ["folded_gemm1", "folded_gemm1+h", "folded_gemm2", "folded_dgemm2",
                 "folded_dgemm1"]
FOLDED = (_FOLDED_GEMMS + [k + "/tiles" for k in _FOLDED_GEMMS]  # both schedules
          + ["folded_wgrad_dw2", "folded_wgrad_dw1"])
KERNELS = FOLDED + ["gemm1_swiglu", "gemm1_swiglu+h", "gemm2", "dgemm2_swiglu_bwd", "dgemm1",
                    "dgemm1_dot_x", "wgrad_dw2", "wgrad_dw1"]
# Per-thread spill stores tolerated (ptxas -v): a few registers' worth. The SwiGLU-backward
# epilogue at four warps spilled ~1800 bytes before config.swiglu_bwd_rows.
MAX_SPILL_BYTES = 64


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_uses_wgmma_and_vector_loads(report, kernel):
    r = report[kernel]
    assert r["wgmma"] > 0, r
    assert r["cp16"] > 0, r  # lost stride specializations compile to no cp.async at all
    assert r["shared_bytes"] <= H100_SHARED_PER_BLOCK, r
    assert 0 < r["registers"] <= 255 and r["spill_bytes"] <= MAX_SPILL_BYTES, r
    if kernel in FOLDED:  # written to fit: no spill at all
        assert r["spill_bytes"] == 0, r


def test_heuristic_configs_fit_in_shared_memory_and_registers():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "grove_kernels.triton.codegen_check",
                          "--heuristic"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 4 * 2 * len(KERNELS)
    too_big = [r for r in rows if r["shared_bytes"] > H100_SHARED_PER_BLOCK]
    assert not too_big, too_big
    spilling = [r for r in rows if r["spill_bytes"] > MAX_SPILL_BYTES or r["registers"] <= 0]
    assert not spilling, spilling


def _check_output(*args, script=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable] + ([str(script)] if script else
                               ["-m", "grove_kernels.triton.codegen_check", *args])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_pointer_offsets_are_64_bit():
    """No 32-bit product of two run-time values (row x stride, program id x rows) reaches a
    pointer offset in any launch the codegen check knows (its config_jobs: kernels added there
    are covered), read from the TTIR of the sm_90 compile. Such a product wraps silently past
    2^31 elements (the SwiGLU-backward partials' pid_n * R did from T ~ 8.4 M)."""
    report = _check_output("--offsets")
    assert {f"{k} {d}" for k in KERNELS for d in ("bf16", "fp32")} <= set(report)
    assert {"combine", "topk_softmax"} <= set(report)
    narrow = {k: v for k, v in report.items() if v}
    assert not narrow, narrow


_NARROW_KERNEL = """
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from grove_kernels.triton.codegen_check import narrow_products

@triton.jit
def rows_times_stride(x_ptr, o_ptr, stride, WIDE: tl.constexpr):
    rows = tl.program_id(0) * 64 + tl.arange(0, 64)
    if WIDE:
        offs = rows.to(tl.int64) * stride
    else:
        offs = rows * stride
    tl.store(o_ptr + offs, tl.load(x_ptr + offs))

out = {}
for wide in (False, True):
    src = ASTSource(fn=rows_times_stride, signature={"x_ptr": "*fp32", "o_ptr": "*fp32",
                    "stride": "i32", "WIDE": "constexpr"}, constexprs={"WIDE": wide})
    ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
    out[str(wide)] = narrow_products(ttir)
print(json.dumps(out))
"""


def test_narrow_product_detector_can_fail(tmp_path):
    """The detector reports a 32-bit row x stride offset and accepts its 64-bit form."""
    script = tmp_path / "narrow.py"  # triton.jit reads the kernel's source from its file
    script.write_text(_NARROW_KERNEL)
    out = _check_output(script=script)
    assert len(out["False"]) == 1 and "arith.muli" in out["False"][0], out
    assert out["True"] == [], out
