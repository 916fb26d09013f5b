"""Which backend a call runs on: the configured name, `auto` (measured table, then the fallback
order), each backend's supports() reasons, the routing / plan stage it is paired with, and the
numerics flags that follow torch's fp32 setting. No GPU needed: devices are described, not used.
"""
from types import SimpleNamespace

import pytest
import torch

import grove_kernels as gk
from grove_kernels import auto_table, backends
from grove_kernels.experts import unsupported


def _call(T=64, H=2048, dtype=torch.bfloat16, device="cuda"):
    """A stand-in for x: resolution reads only its device, dtype and shape."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(T, H))


class _Descriptor:
    def __init__(self, reason=None, runs_on_cpu=False):
        self.reason, self.runs_on_cpu = reason, runs_on_cpu

    def supports(self, x, weights):
        return self.reason


@pytest.fixture
def gpu(monkeypatch):
    """A described sm_90 GPU named `name` on which every backend is available."""
    state = dict(name="NVIDIA H200", cuda=_Descriptor(), triton=_Descriptor())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name=state["name"], major=9))
    real = backends.descriptor
    monkeypatch.setattr(backends, "descriptor",
                        lambda name: state[name] if name in ("cuda", "triton") else real(name))
    return state


@pytest.mark.parametrize("T, expected", [(1, "cuda"), (8, "cuda"), (9, "triton"),
                                         (64, "triton"), (128, "triton"), (129, "cuda"),
                                         (16384, "cuda"), (10 ** 6, "cuda")])
def test_auto_follows_the_measured_h200_table(gpu, T, expected):
    with gk.use_backend("auto"):
        assert backends.resolve(_call(T)) == expected


def test_auto_falls_back_where_nothing_was_measured(gpu):
    gpu["name"] = "NVIDIA A100-SXM4-80GB"
    assert backends.resolve(_call(64)) == "cuda"  # the first that supports the call
    gpu["cuda"] = _Descriptor("hidden_states: the cuda backend runs on sm_90 GPUs")
    assert backends.resolve(_call(64)) == "triton"
    gpu["name"] = "NVIDIA H200"
    assert backends.resolve(_call(1, dtype=torch.float16)) == "triton"  # fp16: not measured


def test_auto_skips_a_measured_backend_that_cannot_run_the_call(gpu):
    gpu["cuda"] = _Descriptor("w1: the cuda backend needs H, I and Ia multiples of 8")
    assert backends.resolve(_call(4096)) == "triton"
    gpu["triton"] = _Descriptor("w1: the triton backend needs contiguous weights")
    assert backends.resolve(_call(4096)) == "torch"


def test_a_named_backend_that_cannot_run_the_call_says_why(gpu):
    gpu["cuda"] = _Descriptor("w1: the cuda backend needs H, I and Ia multiples of 8")
    with gk.use_backend("cuda"), pytest.raises(ValueError, match="cuda.*multiples of 8"):
        backends.resolve(_call(64))


def test_auto_on_the_cpu_is_torch():
    x = torch.zeros(3, 8)
    with gk.use_backend("auto"):
        assert backends.resolve(x) == "torch"
        assert backends.resolve_routing(x.device) == "torch"


def test_auto_table_lookup():
    assert auto_table.lookup("NVIDIA H200", torch.bfloat16, 1) == "cuda"
    assert auto_table.lookup("NVIDIA H200", torch.bfloat16, 64) == "triton"
    assert auto_table.lookup("NVIDIA H200", torch.float16, 64) is None
    assert auto_table.lookup("NVIDIA H100 80GB HBM3", torch.bfloat16, 64) is None
    for (_, _), buckets in auto_table.TABLE.items():
        bounds = [b for b, _ in buckets if b is not None]
        assert bounds == sorted(bounds) and buckets[-1][0] is None
        assert all(name in backends.BACKEND_NAMES for _, name in buckets)


def test_supports_reasons_name_the_argument():
    x = torch.zeros(2, 32, dtype=torch.bfloat16)
    w1, w2 = torch.zeros(4, 48, 32, dtype=torch.bfloat16), torch.zeros(4, 32, 24,
                                                                         dtype=torch.bfloat16)
    dtypes = (torch.bfloat16, torch.float16)
    assert unsupported("cuda", x, (w1, w2, None, None), dtypes, 8) is None
    assert unsupported("cuda", x.float(), (w1, w2, None, None), dtypes, 8).startswith(
        "hidden_states: the cuda backend supports bfloat16, float16, got float32")
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)
    assert unsupported("cuda", x, (w1_t, w2, None, None), dtypes).startswith("w1:")
    a1 = torch.zeros(2, 12, 32, dtype=torch.bfloat16)
    reason = unsupported("cuda", x, (w1, w2, a1, None), dtypes, 8)
    assert reason.startswith("w1:") and "'Ia': 6" in reason


def test_torch_backend_supports_everything():
    from grove_kernels import reference

    assert reference.supports(torch.zeros(2, 3, dtype=torch.float64), (None,) * 4) is None


@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
def test_triton_refuses_float64_and_points_to_torch():
    from grove_kernels import triton as triton_backend

    x = torch.zeros(2, 8, dtype=torch.float64)
    w = (torch.zeros(2, 8, 8, dtype=torch.float64), torch.zeros(2, 8, 4, dtype=torch.float64))
    assert "use the torch backend" in triton_backend.supports(x, w + (None, None))
    with gk.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        gk.fused_experts(x, *w, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))


@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
def test_stage_pairs_routing_and_plan_with_the_backend():
    from grove_kernels import plan, routing
    from grove_kernels.triton import plan as triton_plan
    from grove_kernels.triton import routing as triton_routing

    cpu = torch.device("cpu")
    assert backends.stage("torch", cpu) == (routing, plan)
    # Under the interpreter (how the CPU suite runs Triton) the triton stage runs here too.
    assert backends.stage("triton", cpu) == (triton_routing, triton_plan)


@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
def test_fp32_dots_follow_torch_tf32_setting():
    """Triton's fp32 tl.dot defaults to tf32; the kernels run IEEE fp32 unless torch allows
    tf32 (torch.backends.cuda.matmul.allow_tf32), as torch's own matmuls do."""
    from grove_kernels.triton.gemm_common import dot_flags

    matmul = torch.backends.cuda.matmul
    # A property of torch's, set and restored by hand (monkeypatch's undo deletes it).
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dot_flags(torch.float32)["IEEE"] is True
        assert dot_flags(torch.bfloat16)["IEEE"] is False
        matmul.allow_tf32 = True
        assert dot_flags(torch.float32)["IEEE"] is False
    finally:
        matmul.allow_tf32 = before


def test_unknown_or_unavailable_names_are_refused():
    with pytest.raises(ValueError, match="backend"):
        gk.set_backend("cutlass")
    if "cuda" not in gk.available_backends():
        with pytest.raises(ValueError, match="not available"):
            gk.set_backend("cuda")
