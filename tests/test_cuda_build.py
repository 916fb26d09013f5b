"""The CUDA/CUTLASS extension (csrc/): build checks that run on the CPU machine, plus GPU tests.

CPU (skipped without nvcc or the CUTLASS headers): every .cu compiles for sm_90a, each GEMM
object's SASS has HGMMA (an sm_90 build without the `a` silently compiles into a kernel that
only prints an error), the .cu files are torch-free, and grove_kernels._C imports under the
installed torch with its ops registered and argument errors reported cleanly.
Objects come from csrc/build_cuda.py's cache (build/grove_cuda/), filled by `pip install`.
"""
import importlib.util
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "grove_build_cuda", os.path.join(ROOT, "csrc", "build_cuda.py"))
build_cuda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_cuda)

_missing = build_cuda.missing_prerequisites()
pytestmark = pytest.mark.skipif(bool(_missing), reason="; ".join(_missing) or "ok")

CONFIGS = [f"{dt}_{layout}_{tile}" for dt in ("bf16", "fp16")
           for layout, tiles in (("tn", ("coop_128x256_c11", "pingpong_64x128_c11")),
                                 ("tn_swiglu", ("coop_128x256_c11", "pingpong_64x128_c11")),
                                 ("tt", ("coop_128x256_c11", "pingpong_64x128_c11")),
                                 ("nt", ("coop_128x256_c11",)))
           for tile in tiles]
SCHEMAS = {
    "grouped_gemm": "grove_cuda::grouped_gemm(Tensor[] a, Tensor[] b, Tensor(a!)[] out, "
                    "Tensor start, Tensor count, str config, int stream) -> ()",
    "grouped_gemm_configs": "grove_cuda::grouped_gemm_configs() -> str[]",
    "grouped_gemm_workspace_size": "grove_cuda::grouped_gemm_workspace_size(int num_problems, "
                                   "str config, int sm_count) -> int",
    "gather_rows": "grove_cuda::gather_rows(Tensor x, Tensor row_token, Tensor? row_weight, "
                   "int rows_e, Tensor? end_e, Tensor? end_a, Tensor(a!) out, int stream) -> ()",
    "swiglu_fwd": "grove_cuda::swiglu_fwd(Tensor h, int rows_e, Tensor? end_e, Tensor? end_a, "
                  "Tensor(a!) out, int stream) -> ()",
    "swiglu_bwd": "grove_cuda::swiglu_bwd(Tensor g, Tensor h, Tensor? row_weight, int rows_e, "
                  "Tensor? end_e, Tensor? end_a, Tensor(a!) dh, Tensor(b!)? d_row_weight, "
                  "int stream) -> ()",
    "combine_rows": "grove_cuda::combine_rows(Tensor rows, Tensor token_rows, Tensor token_mask, "
                    "Tensor? token_weight, Tensor(a!) out, int stream) -> ()",
    "rows_dot_scale": "grove_cuda::rows_dot_scale(Tensor(a!) rows, Tensor x, Tensor row_token, "
                      "Tensor row_weight, int rows_e, Tensor? end_e, Tensor? end_a, "
                      "Tensor(b!)? dot, int stream) -> ()",
}


@pytest.fixture(scope="module")
def objects():
    return build_cuda.compile_objects()


@pytest.fixture(scope="module")
def cuda_mod():
    import grove_kernels.cuda.ext as mod

    if not mod.is_built():
        pytest.fail("nvcc and CUTLASS are present but grove_kernels._C did not import "
                    f"({mod._import_error}); build it with "
                    "`GROVE_BUILD_CUDA=1 pip install --no-build-isolation -e .`")
    return mod


# ----------------------------------------------------------------------------- build (CPU)

def test_every_cu_compiles_for_sm90a(objects):
    sources = build_cuda.cu_sources()
    assert sources and sorted(objects) == sources
    names = {os.path.relpath(s, build_cuda.CSRC) for s in sources}
    assert {"grouped_args.cu", "rows.cu"} | {os.path.join("gemm", f"grouped_{c}.cu")
                                            for c in CONFIGS} == names
    for obj in objects.values():
        assert os.path.getsize(obj) > 0
    assert "-gencode=arch=compute_90a,code=sm_90a" in build_cuda.NVCC_FLAGS
    assert "-DNDEBUG" in build_cuda.NVCC_FLAGS


def test_gemm_objects_contain_hgmma(objects):
    cuobjdump = build_cuda.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton/backends/nvidia/bin)")
    gemms = {s: o for s, o in objects.items() if build_cuda.is_gemm_source(s)}
    assert len(gemms) == len(CONFIGS)
    counts = {os.path.basename(o): build_cuda.count_hgmma(o, cuobjdump) for o in gemms.values()}
    assert all(n > 0 for n in counts.values()), f"no wgmma (HGMMA) in SASS: {counts}"


_TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2|pybind11|Python)\b',
                            re.MULTILINE)


def test_cuda_sources_are_torch_free():
    files = build_cuda.cu_sources() + build_cuda.headers()
    offenders = [f for f in files if _TORCH_INCLUDE.search(open(f).read())]
    assert not offenders, f"torch/ATen/c10 includes in torch-free CUDA files: {offenders}"


def test_one_extern_c_launcher_per_gemm_file():
    header = open(os.path.join(build_cuda.CSRC, "include", "grove_cuda.h")).read()
    for src in build_cuda.cu_sources():
        if build_cuda.is_gemm_source(src):
            m = re.match(r"grouped_(bf16|fp16)_(tn|tn_swiglu|tt|nt)_((?:coop|pingpong)_\w+)\.cu$",
                         os.path.basename(src))
            dt, layout, tile = m.groups()
            text = open(src).read()
            assert f"GROVE_DEFINE_GROUPED_GEMM(grove_grouped_{dt}_{layout}_{tile}," in text
            assert f"GROVE_LAYOUT_{layout.split('_')[0].upper()}" in text
            assert ("grove::EpilogueSwiglu" in text) == (layout == "tn_swiglu")
            assert ("bfloat16_t" if dt == "bf16" else "half_t") in text
            assert f"X({dt}, {layout}, {tile})" in header


# ----------------------------------------------------------------------- extension (CPU torch)

def test_extension_registers_ops(cuda_mod):
    schemas = cuda_mod.op_schemas()
    for name, schema in SCHEMAS.items():
        assert schemas.get(name) == schema
    assert sorted(torch.ops.grove_cuda.grouped_gemm_configs()) == sorted(CONFIGS)
    info = cuda_mod.build_info()
    assert info["built"] and sorted(info["gemm_configs"]) == sorted(CONFIGS)
    assert set(SCHEMAS) <= set(info["ops"])


def test_auto_never_picks_the_untested_backend(cuda_mod):
    from grove_kernels import backends

    # Never run on a GPU: usable by name on an sm_90 GPU, but `auto` must not pick it.
    from grove_kernels.cuda import backend as cuda_backend

    assert cuda_backend.AUTO is False
    for name in ("topk", "experts_forward", "experts_backward"):
        assert callable(getattr(cuda_backend, name))
    if not torch.cuda.is_available():
        assert cuda_mod.is_available() is False
        assert "cuda" not in backends.available_backends()


def _args(T=4, K=16, N=32, P=2, dtype=torch.bfloat16, device="cpu"):
    a = [torch.zeros(T, K, dtype=dtype, device=device)]
    b = [torch.zeros(P, N, K, dtype=dtype, device=device)]
    out = [torch.zeros(T, N, dtype=dtype, device=device)]
    start = torch.zeros(P, dtype=torch.int64, device=device)
    count = torch.zeros(P, dtype=torch.int64, device=device)
    return a, b, out, start, count


def _call(a, b, out, start, count, config="bf16_tn_coop_128x256_c11"):
    torch.ops.grove_cuda.grouped_gemm(a, b, out, start, count, config, 0)


@pytest.mark.parametrize("mutate, message", [
    (lambda x: x.update(config="nope"), r"config must be one of \[bf16_tn_coop_128x256_c11"),
    (lambda x: x.update(a=x["a"] * 3), r"a must hold 1 to 2 tensors"),
    (lambda x: x.update(b=x["b"] + x["b"]), r"a, b and out must have the same length"),
    (lambda x: x.update(a=[x["a"][0].float()]), r"must be BFloat16 for config"),
    (lambda x: x.update(config="fp16_tn_coop_128x256_c11"), r"must be Half for config"),
    (lambda x: x.update(a=[x["a"][0][None]]), r"a\[0\] must be 2-D"),
    (lambda x: x.update(b=[x["b"][0][..., :8].contiguous()]), r"b\[0\] has K = 8 but a\[0\] has K = 16"),
    (lambda x: x.update(out=[x["out"][0][:, :8]]), r"out\[0\] must be \[4, 32\]"),
    (lambda x: x.update(count=x["count"].int()), r"both be int32 or both int64"),
    (lambda x: x.update(start=x["start"][:1], count=x["count"][:1]),
     r"one entry per problem \(2 in all segments\)"),
    (lambda x: x.update(a=[torch.zeros(4, 12, dtype=torch.bfloat16)],
                        b=[torch.zeros(2, 32, 12, dtype=torch.bfloat16)]), r"multiples of 8"),
    (lambda x: x.update(a=[x["a"][0].t().contiguous().t()]), r"last dimension .* contiguous"),
    (lambda x: None, r"must be on a CUDA device"),
])
def test_bad_arguments_raise_clear_errors(cuda_mod, mutate, message):
    a, b, out, start, count = _args()
    kw = dict(a=a, b=b, out=out, start=start, count=count, config="bf16_tn_coop_128x256_c11")
    mutate(kw)
    with pytest.raises(RuntimeError, match=message):
        _call(kw["a"], kw["b"], kw["out"], kw["start"], kw["count"], kw["config"])


def test_workspace_size_query(cuda_mod):
    for config in CONFIGS:
        small = torch.ops.grove_cuda.grouped_gemm_workspace_size(8, config, 132)
        large = torch.ops.grove_cuda.grouped_gemm_workspace_size(200, config, 132)
        assert 0 < small < large
        assert torch.ops.grove_cuda.grouped_gemm_workspace_size(0, config, 132) == 0
    with pytest.raises(RuntimeError, match="sm_count must be > 0"):
        torch.ops.grove_cuda.grouped_gemm_workspace_size(8, CONFIGS[0], 0)


def _bf(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("b, out, message", [
    (_bf(4, 32), _bf(2, 16, 32), r"must be on a CUDA device"),  # well-formed: reaches the device
    (_bf(5, 32), _bf(2, 16, 32), r"b\[0\] must have the rows of a\[0\] \(4\)"),
    (_bf(4, 32), _bf(2, 16, 24), r"out\[0\] must be \[P, 16, 32\]"),
    (_bf(2, 4, 32), _bf(2, 16, 32), r"b\[0\] must be 2-D \[rows, N\]"),
])
def test_weight_gradient_layout_shapes(cuda_mod, b, out, message):
    start = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=message):
        _call([_bf(4, 16)], [b], [out], start, start.clone(), "bf16_nt_coop_128x256_c11")


@pytest.mark.parametrize("n, out_width, message", [
    (32, 16, r"must be on a CUDA device"),  # well-formed: reaches the device
    (32, 32, r"out\[0\] must be \[4, 16\] \(half of b's N\)"),
    (24, 12, r"b\[0\] must have N a multiple of 16"),
])
def test_fused_swiglu_layout_shapes(cuda_mod, n, out_width, message):
    start = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=message):
        _call([_bf(4, 16)], [_bf(2, n, 16)], [_bf(4, out_width)], start, start.clone(),
              "bf16_tn_swiglu_coop_128x256_c11")


def _long(*shape):
    return torch.zeros(*shape, dtype=torch.int64)


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.grove_cuda.gather_rows(_bf(3, 16).float(), _long(4), None, 4, None, None,
                                              _bf(4, 16), 0), r"x must be bfloat16 or float16"),
    (lambda: torch.ops.grove_cuda.gather_rows(_bf(3, 16), _long(4), None, 4, None, None,
                                              _bf(4, 16), 0), r"must be on a CUDA device"),
    (lambda: torch.ops.grove_cuda.swiglu_fwd(_bf(4, 30), 4, None, None, _bf(4, 16), 0),
     r"must be on a CUDA device"),
    (lambda: torch.ops.grove_cuda.combine_rows(_bf(4, 16), _long(2, 3), torch.zeros(2, 3),
                                               None, _bf(2, 16), 0), r"must be on a CUDA device"),
    (lambda: torch.ops.grove_cuda.rows_dot_scale(_bf(4, 16).half(), _bf(3, 16), _long(4),
                                                 torch.zeros(4), 4, None, None, None, 0),
     r"must be on a CUDA device"),
])
def test_row_ops_reject_bad_arguments(cuda_mod, call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
