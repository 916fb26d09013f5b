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

CONFIGS = ["coop_128x256_c11", "pingpong_64x128_c11"]
SCHEMAS = {
    "grouped_gemm_bf16": "grove_cuda::grouped_gemm_bf16(Tensor[] a, Tensor[] b, Tensor(a!)[] out, "
                         "Tensor start, Tensor count, str config, int stream) -> ()",
    "grouped_gemm_configs": "grove_cuda::grouped_gemm_configs() -> str[]",
    "grouped_gemm_workspace_size": "grove_cuda::grouped_gemm_workspace_size(int num_problems, "
                                   "str config, int sm_count) -> int",
}


@pytest.fixture(scope="module")
def objects():
    return build_cuda.compile_objects()


@pytest.fixture(scope="module")
def cuda_mod():
    import grove_kernels.cuda as mod

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
    assert {"grouped_args.cu", os.path.join("gemm", "grouped_bf16_tn_coop_128x256_c11.cu"),
            os.path.join("gemm", "grouped_bf16_tn_pingpong_64x128_c11.cu")} <= names
    for obj in objects.values():
        assert os.path.getsize(obj) > 0
    assert "-gencode=arch=compute_90a,code=sm_90a" in build_cuda.NVCC_FLAGS
    assert "-DNDEBUG" in build_cuda.NVCC_FLAGS


def test_gemm_objects_contain_hgmma(objects):
    cuobjdump = build_cuda.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton/backends/nvidia/bin)")
    gemms = {s: o for s, o in objects.items() if build_cuda.is_gemm_source(s)}
    assert len(gemms) >= 2
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
            config = re.match(r"grouped_bf16_tn_(\w+)\.cu$", os.path.basename(src)).group(1)
            assert f"GROVE_DEFINE_GROUPED_GEMM(grove_grouped_bf16_tn_{config}," in open(src).read()
            assert f"GROVE_DECLARE_GROUPED_GEMM(grove_grouped_bf16_tn_{config})" in header


# ----------------------------------------------------------------------- extension (CPU torch)

def test_extension_registers_ops(cuda_mod):
    schemas = cuda_mod.op_schemas()
    for name, schema in SCHEMAS.items():
        assert schemas.get(name) == schema
    assert sorted(torch.ops.grove_cuda.grouped_gemm_configs()) == sorted(CONFIGS)
    info = cuda_mod.build_info()
    assert info["built"] and sorted(info["gemm_configs"]) == sorted(CONFIGS)
    assert set(SCHEMAS) <= set(info["ops"])


def test_not_a_backend_yet(cuda_mod):
    from grove_kernels import backends

    # Low-level ops only: `auto` must never pick cuda until the full backend is GPU-tested.
    assert cuda_mod.is_available() is False
    assert cuda_mod.build_info()["backend_available"] is False
    assert "cuda" not in backends.available_backends()


def _args(T=4, K=16, N=32, P=2, dtype=torch.bfloat16, device="cpu"):
    a = [torch.zeros(T, K, dtype=dtype, device=device)]
    b = [torch.zeros(P, N, K, dtype=dtype, device=device)]
    out = [torch.zeros(T, N, dtype=dtype, device=device)]
    start = torch.zeros(P, dtype=torch.int64, device=device)
    count = torch.zeros(P, dtype=torch.int64, device=device)
    return a, b, out, start, count


def _call(a, b, out, start, count, config="coop_128x256_c11"):
    torch.ops.grove_cuda.grouped_gemm_bf16(a, b, out, start, count, config, 0)


@pytest.mark.parametrize("mutate, message", [
    (lambda x: x.update(config="nope"), r"config must be one of \[coop_128x256_c11"),
    (lambda x: x.update(a=x["a"] * 3), r"a must hold 1 to 2 tensors"),
    (lambda x: x.update(b=x["b"] + x["b"]), r"a, b and out must have the same length"),
    (lambda x: x.update(a=[x["a"][0].float()]), r"must be bfloat16"),
    (lambda x: x.update(a=[x["a"][0][None]]), r"a\[0\] must be 2-D"),
    (lambda x: x.update(b=[x["b"][0][..., :8].contiguous()]), r"b\[0\] has K = 8 but a\[0\] has K = 16"),
    (lambda x: x.update(out=[x["out"][0][:, :8]]), r"out\[0\] must be \[4, 32\]"),
    (lambda x: x.update(count=x["count"].int()), r"both be int32 or both int64"),
    (lambda x: x.update(start=x["start"][:1], count=x["count"][:1]),
     r"one entry per problem \(2 = sum of b\[s\].size\(0\)\)"),
    (lambda x: x.update(a=[torch.zeros(4, 12, dtype=torch.bfloat16)],
                        b=[torch.zeros(2, 32, 12, dtype=torch.bfloat16)]), r"multiples of 8"),
    (lambda x: x.update(a=[x["a"][0].t().contiguous().t()]), r"last dimension .* contiguous"),
    (lambda x: None, r"must be on a CUDA device"),
])
def test_bad_arguments_raise_clear_errors(cuda_mod, mutate, message):
    a, b, out, start, count = _args()
    kw = dict(a=a, b=b, out=out, start=start, count=count, config="coop_128x256_c11")
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


# -------------------------------------------------------------------------------- GPU tests

def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _routing(T, k, E, gen, skip_experts=()):
    """topk ids over the experts not in skip_experts (so those get zero rows)."""
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    return ids, w


def _problem(T=96, k=4, E=16, S=4, H=256, N1=384, N2=64, skip=(3, 7), seed=0, device="cuda"):
    from grove_kernels.plan import build_plan

    gen = torch.Generator().manual_seed(seed)
    ids, w = _routing(T, k, E, gen, skip)
    plan = build_plan(ids.to(device), w.to(device), E, group_size=S, adjugate_scale=0.5)
    G = E // S
    x = torch.randn(T, H, generator=gen).to(device, torch.bfloat16)
    w1 = (torch.randn(E, N1, H, generator=gen) / H ** 0.5).to(device, torch.bfloat16)
    a1 = (torch.randn(G, N2, H, generator=gen) / H ** 0.5).to(device, torch.bfloat16)
    rows = x[plan.row_token]
    Re = plan.num_expert_rows
    return plan, [rows[:Re], rows[Re:]], [w1, a1]


def _reference(plan, a, b):
    start, count = (t.cpu() for t in plan.problem_rows())
    ref = [torch.zeros(t.shape[0], w.shape[1], dtype=torch.float32, device=t.device)
           for t, w in zip(a, b)]
    P0 = b[0].shape[0]
    for p in range(start.numel()):
        s = 0 if p < P0 else 1
        j = p if s == 0 else p - P0
        r0 = int(start[p]) - (0 if s == 0 else a[0].shape[0])
        m = int(count[p])
        ref[s][r0:r0 + m] = a[s][r0:r0 + m].float() @ b[s][j].float().t()
    return ref, start, count


def _check(plan, out, ref, start, count, P0):
    Re = out[0].shape[0]
    for p in range(start.numel()):
        s = 0 if p < P0 else 1
        r0 = int(start[p]) - (0 if s == 0 else Re)
        m = int(count[p])
        torch.testing.assert_close(out[s][r0:r0 + m].float(), ref[s][r0:r0 + m],
                                   atol=2e-2, rtol=2e-2, msg=f"problem {p}")


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_grouped_gemm_matches_torch(cuda_mod, config, index_dtype):
    plan, a, b = _problem()
    ref, start, count = _reference(plan, a, b)
    assert (count[:16] == 0).sum() >= 2  # skipped experts: problems with zero rows
    sentinel = 7.0
    out = [torch.full((t.shape[0], w.shape[1]), sentinel, dtype=torch.bfloat16, device="cuda")
           for t, w in zip(a, b)]
    s_dev, c_dev = (t.to(index_dtype) for t in plan.problem_rows())
    cuda_mod.grouped_gemm_bf16(a, b, out, s_dev, c_dev, config)
    torch.cuda.synchronize()
    _check(plan, out, ref, start, count, b[0].shape[0])


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
def test_grouped_gemm_experts_only_segment(cuda_mod):
    plan, a, b = _problem()
    start, count = plan.problem_rows()
    E = b[0].shape[0]
    out = [torch.zeros(a[0].shape[0], b[0].shape[1], dtype=torch.bfloat16, device="cuda")]
    cuda_mod.grouped_gemm_bf16(a[:1], b[:1], out, start[:E].contiguous(), count[:E].contiguous())
    ref, s_cpu, c_cpu = _reference(plan, a, b)
    for p in range(E):
        r0, m = int(s_cpu[p]), int(c_cpu[p])
        torch.testing.assert_close(out[0][r0:r0 + m].float(), ref[0][r0:r0 + m],
                                   atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("config", CONFIGS)
def test_grouped_gemm_cuda_graph_replays_new_routing(cuda_mod, config):
    plan0, a0, b = _problem(seed=1)
    s0, c0 = plan0.problem_rows()
    static_a = [t.clone() for t in a0]
    static_s, static_c = s0.clone(), c0.clone()
    out = [torch.zeros(t.shape[0], w.shape[1], dtype=torch.bfloat16, device="cuda")
           for t, w in zip(static_a, b)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (CUTLASS sets smem attributes)
        cuda_mod.grouped_gemm_bf16(static_a, b, out, static_s, static_c, config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_mod.grouped_gemm_bf16(static_a, b, out, static_s, static_c, config)
    for seed in (2, 3):
        plan, a, _ = _problem(seed=seed)
        s, c = plan.problem_rows()
        for dst, src in zip(static_a, a):
            dst.copy_(src)
        static_s.copy_(s)
        static_c.copy_(c)
        graph.replay()
        torch.cuda.synchronize()
        ref, s_cpu, c_cpu = _reference(plan, a, b)
        _check(plan, out, ref, s_cpu, c_cpu, b[0].shape[0])
