"""Which backend a call runs on: the configured name, `auto` (measured table, then the fallback
order), each backend's supports() reasons (refused by backends.get, the one place), the routing
/ plan stage it is paired with, and the numerics flags that follow torch's fp32 setting. No GPU
needed: devices are described, not used.
"""
import glob
import json
import os
from types import SimpleNamespace

import pytest
import torch

import grove_kernels as gk
from grove_kernels import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from grove_kernels.backends import unsupported


def _call(T=64, H=2048, dtype=torch.bfloat16, device="cuda"):
    """A stand-in for x: resolution reads only its device, dtype and shape."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(T, H))


def _w(*shape):
    return SimpleNamespace(shape=shape)


# grove-33b's weights, described: resolution reads their shapes only.
GROVE_33B = (_w(128, 1536, 2048), _w(128, 2048, 768), _w(64, 256, 2048), _w(64, 2048, 128))
PLAIN_33B = GROVE_33B[:2] + (None, None)


class _Described(backends.Backend):
    """A backend that is available and answers supports() with `reason`."""

    def __init__(self, name, reason=None):
        self.name, self.reason = name, reason

    def supports(self, x, weights):
        return self.reason


class _Gpu(dict):
    """The described GPU's state: its name, and the cuda / triton backends (assigning a
    _Described to "cuda" or "triton" replaces that backend in the registry)."""

    def __init__(self, monkeypatch):
        super().__init__(name="NVIDIA H200")
        self.monkeypatch = monkeypatch
        for name in ("cuda", "triton"):
            self[name] = _Described(name)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key in ("cuda", "triton"):
            value.name = key
            self.monkeypatch.setitem(backends.BACKENDS, key, value)
            self.monkeypatch.setitem(backends._available_cache, key, True)


W = GROVE_33B


@pytest.fixture
def gpu(monkeypatch):
    """A described sm_90 GPU named `name` on which every backend is available."""
    state = _Gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name=state["name"], major=9))
    return state


# The H200 records of 2026-12-04 (each backend on its default layout): grove inference triton
# up to T = 128 (folded: 74 us at T = 1 against cuda's 82), cuda above; plain the same except
# T <= 8 (cuda 67 against 69 us).
@pytest.mark.parametrize("T, grove, plain", [(1, "triton", "cuda"), (8, "triton", "cuda"),
                                             (9, "triton", "triton"), (64, "triton", "triton"),
                                             (128, "triton", "triton"), (129, "cuda", "cuda"),
                                             (16384, "cuda", "cuda"), (10 ** 6, "cuda", "cuda")])
def test_auto_follows_the_measured_h200_table(gpu, T, grove, plain):
    with gk.use_backend("auto"):
        assert backends.resolve(_call(T), W, top_k=8) == grove
        assert backends.resolve(_call(T), PLAIN_33B, top_k=8) == plain


@pytest.mark.parametrize("T, expected", [(1, "triton"), (64, "triton"), (128, "triton"),
                                         (1024, "cuda"), (16384, "cuda")])
def test_auto_for_training_follows_the_forward_backward_timings(gpu, T, expected):
    """Training is chosen from forward + backward rows: on the H200 (2026-12-04) triton's wins
    up to T = 64 (528 against 1308 us at T = 1), cuda's from T = 256 (10620 against 17429 us
    at T = 16384)."""
    with gk.use_backend("auto"):
        assert backends.resolve(_call(T), W, training=True, top_k=8) == expected


def test_auto_needs_the_measured_shape(gpu):
    other = (_w(128, 1024, 2048),) + GROVE_33B[1:]  # I = 512: not measured
    assert backends.resolve(_call(64), other, top_k=8) == "cuda"  # the fallback order
    assert backends.resolve(_call(64), W, top_k=4) == "cuda"  # k = 4: not measured


def test_auto_falls_back_where_nothing_was_measured(gpu):
    gpu["name"] = "NVIDIA A100-SXM4-80GB"
    assert backends.resolve(_call(64), W, top_k=8) == "cuda"  # the first that supports it
    gpu["cuda"] = _Described("x", "hidden_states: the cuda backend runs on sm_90 GPUs")
    assert backends.resolve(_call(64), W, top_k=8) == "triton"
    gpu["name"] = "NVIDIA H200"
    assert backends.resolve(_call(1, dtype=torch.float16), W, top_k=8) == "triton"  # fp16


def test_auto_skips_a_measured_backend_that_cannot_run_the_call(gpu):
    gpu["cuda"] = _Described("x", "w1: the cuda backend needs H, I and Ia multiples of 8")
    assert backends.resolve(_call(4096), W, top_k=8) == "triton"
    gpu["triton"] = _Described("x", "w1: the triton backend needs contiguous weights")
    assert backends.resolve(_call(4096), W, top_k=8) == "torch"


def test_a_named_backend_that_cannot_run_the_call_says_why(gpu):
    gpu["cuda"] = _Described("x", "w1: the cuda backend needs H, I and Ia multiples of 8")
    with gk.use_backend("cuda"):
        name = backends.resolve(_call(64), W)  # resolution does not re-check a named one
        assert name == "cuda"
        with pytest.raises(ValueError, match="cuda.*multiples of 8"):
            backends.get(name, _call(64), W)  # the op's lookup refuses it


def test_registry_holds_one_object_per_backend():
    assert set(backends.BACKENDS) == set(backends.BACKEND_NAMES) == {"torch", "triton", "cuda"}
    for name, backend in backends.BACKENDS.items():
        assert isinstance(backend, backends.Backend) and backend.name == name
    torch_backend = backends.get("torch", torch.zeros(2, 3), W)
    from grove_kernels import plan, reference, routing

    assert torch_backend.forward is reference.forward  # bound once: no delegation left
    assert torch_backend.build_plan is plan.build_plan and torch_backend.topk is routing.topk


def test_auto_on_the_cpu_is_torch():
    x = torch.zeros(3, 8)
    with gk.use_backend("auto"):
        assert backends.resolve(x, W) == "torch"
        assert backends.resolve(x) == "torch"  # the routing stage alone


def test_auto_table_lookup():
    shape = backends.shape_of(2048, 768, 128, 128, 8)
    assert backends.lookup("NVIDIA H200", torch.bfloat16, shape, False, 1) == "triton"
    assert backends.lookup("NVIDIA H200", torch.bfloat16, shape, False, 64) == "triton"
    assert backends.lookup("NVIDIA H200", torch.bfloat16, shape, False, 4096) == "cuda"
    assert backends.lookup("NVIDIA H200", torch.bfloat16, shape, True, 64) == "triton"
    assert backends.lookup("NVIDIA H200", torch.float16, shape, False, 64) is None
    assert backends.lookup("NVIDIA H100 80GB HBM3", torch.bfloat16, shape, False, 64) is None
    for f in os.listdir(backends.TABLES_DIR):
        for table in backends._tables(f[len("device_name="):-len(".json")].replace("_", " ")):
            bounds = [b for b, _ in table["buckets"] if b is not None]
            assert bounds == sorted(bounds) and table["buckets"][-1][0] is None
            assert all(name in backends.BACKEND_NAMES for _, name in table["buckets"])
            assert table["pass"] in backends.PASSES


def test_fill_auto_table_reproduces_the_shipped_h200_table(tmp_path):
    from grove_kernels.tools import fill_auto_table

    records = [os.path.join(ROOT, "bench", "results", f"h200_2026-12-04_{name}.json")
               for name in ("layouts_uniform", "layouts_coactive", "cuda_packed_down")]
    assert fill_auto_table.main(records + ["--out-dir", str(tmp_path)]) == 0
    name = backends.file_name("NVIDIA H200")
    with open(tmp_path / name) as f, open(os.path.join(backends.TABLES_DIR, name)) as g:
        assert json.load(f) == json.load(g)


def test_fill_auto_table_buckets():
    from grove_kernels.tools.fill_auto_table import buckets

    measured = {1: {"cuda": 80, "triton": 90}, 64: {"cuda": 380, "triton": 360},
                256: {"cuda": 400, "triton": 470}, 1024: {"cuda": 500, "triton": 560}}
    assert buckets(measured) == [[8, "cuda"], [128, "triton"], [None, "cuda"]]
    assert buckets({16: {"triton": 1.0, "cuda": 2.0}}) == [[None, "triton"]]


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
    assert backends.BACKENDS["torch"].supports(torch.zeros(2, 3, dtype=torch.float64), W) is None


@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
def test_triton_refuses_float64_and_points_to_torch():
    x = torch.zeros(2, 8, dtype=torch.float64)
    w = (torch.zeros(2, 8, 8, dtype=torch.float64), torch.zeros(2, 8, 4, dtype=torch.float64))
    assert "use the torch backend" in backends.BACKENDS["triton"].supports(x, w + (None, None))
    with gk.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        gk.fused_experts(x, *w, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))


@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
def test_stage_pairs_routing_and_plan_with_the_backend():
    from grove_kernels import plan, routing
    from grove_kernels.triton import plan as triton_plan
    from grove_kernels.triton import routing as triton_routing

    x = torch.zeros(2, 3)
    torch_backend = backends.get("torch", x)
    assert (torch_backend.topk, torch_backend.build_plan) == (routing.topk, plan.build_plan)
    # Under the interpreter (how the CPU suite runs Triton) the triton stage runs here too.
    triton_backend = backends.get("triton", x)
    assert (triton_backend.topk, triton_backend.build_plan) == (triton_routing.topk,
                                                                triton_plan.build_plan)


@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
def test_fp32_dots_follow_torch_tf32_setting():
    """Triton's fp32 tl.dot defaults to tf32; the kernels run IEEE fp32 unless torch allows
    tf32 (torch.backends.cuda.matmul.allow_tf32), as torch's own matmuls do."""
    from grove_kernels.triton.config import dot_flags

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
