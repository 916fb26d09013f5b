"""The training anchors of bench.anchors (Liger-Kernel's fused MoE, ScatterMoE) as the bench
calls them, through the variants' own forward functions, against the float64 oracle
(tests/oracle.py): y and every gradient (x, w1, w2, [a1, a2,] topk_weights) of ⟨y, g⟩.

Both are Triton kernels. Without a GPU they run here under Triton's interpreter
(TRITON_INTERPRET=1 while this file's tests run: the interpreter is chosen when a kernel is
decorated and consulted when it runs), in fp32 against float64 at docs/design.md §5's 1e-4. bf16 is
not checked there: the interpreter computes both packages' bf16 forward wrongly alike (rel.
err ~1e10 where fp16 gives 6e-4) and has no bf16 atomic_add (Liger's d topk_weights). On a GPU
they run natively in bf16 (≤ 2e-2). LIGER_FUSED_MOE_AUTOTUNE=0 at Liger's import pins one
config (its autotuner cannot run under the interpreter, and on a GPU it would compile every
config: minutes). Where a package is absent (CI installs neither), its tests skip with the
reason. The probe tests need no package.

    tiny shapes: T 5 (odd), H 64, E 8, k 4, I 32, S 2 (G 4), Ia 16; uniform routing
"""
import importlib
import os
import sys
import types

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

import oracle  # noqa: E402

from bench import anchors, variants  # noqa: E402
from bench.presets import Preset  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
TOL = 2e-2 if GPU else 1e-4
TINY = Preset("anchor-test", hidden=64, experts=8, top_k=4, intermediate=32, group_size=2,
              adj_intermediate=16, adj_scale=0.05, cpu_tokens=())
T = 5
_IMPORTED_HERE = set()  # packages this file imported under the interpreter


@pytest.fixture(scope="module")
def interpreter():
    """TRITON_INTERPRET=1 for this file's tests when there is no GPU: the interpreter is
    chosen when a kernel is decorated and consulted again when it runs."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


def _import(module, env=None):
    """Imports `module` with `env` set during the import; skips with the reason when the
    package is absent or was imported before without the interpreter (compiled kernels)."""
    top = module.split(".")[0]
    if not GPU and top in sys.modules and top not in _IMPORTED_HERE:
        pytest.skip(f"{top} was imported before this file set TRITON_INTERPRET: its kernels "
                    f"may be compiled ones, which need a GPU")
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        pytest.skip(f"{module} not importable ({type(exc).__name__}: {exc})")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _IMPORTED_HERE.add(top)
    return mod


@pytest.fixture(scope="module")
def liger(interpreter):
    # One pinned config on a GPU too: these tests check the wiring, and autotuning every
    # config of every kernel at a new shape costs minutes of compiling.
    mod = _import("liger_kernel.ops.fused_moe", {"LIGER_FUSED_MOE_AUTOTUNE": "0"})
    kernels = sys.modules["liger_kernel.ops.fused_moe_kernels"]
    if not GPU and not getattr(kernels, "_AUTOTUNE_DISABLED", True):
        pytest.skip("liger_kernel was imported with its autotuner on: it cannot run under "
                    "the interpreter")
    return mod


@pytest.fixture(scope="module")
def scattermoe(interpreter):
    return _import("scattermoe")


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    H, E, k, I, G, Ia = (TINY.hidden, TINY.experts, TINY.top_k, TINY.intermediate, TINY.groups,
                         TINY.adj_intermediate)

    def rand(*shape, fan_in=1):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / fan_in**0.5

    t = {"x": rand(T, H), "w1": rand(E, 2 * I, H, fan_in=H), "w2": rand(E, H, I, fan_in=I),
         "a1": rand(G, 2 * Ia, H, fan_in=H), "a2": rand(G, H, Ia, fan_in=Ia),
         "w": torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1}
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    # token 0 takes both experts of group 0: a shared adjugate the two-call scheme runs twice
    ids[0, :2] = torch.tensor([0, 1], dtype=torch.int32)
    ids[0, 2:] = torch.tensor([4, 6], dtype=torch.int32)
    return t, ids, rand(T, H)


def _rel(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def _check_variant(name):
    """Runs variant `name` through the bench's own Tensors / forward and compares y and its
    gradients with the oracle of the variant's layer (grove or plain)."""
    variant = variants.VARIANTS_BY_NAME[name]
    t, ids, g = _problem()
    grove = variant.layer == "grove"
    names = ["x", "w1", "w2"] + (["a1", "a2"] if grove else []) + ["w"]
    ref_leaves = {n: t[n].clone().requires_grad_() for n in names}
    if grove:
        ref = oracle.grove_layer(*(ref_leaves[n] for n in ("x", "w1", "w2", "a1", "a2", "w")),
                                 ids.long(), TINY.group_size, TINY.adj_scale)
    else:
        ref = oracle.fused_experts(ref_leaves["x"], ref_leaves["w1"], ref_leaves["w2"],
                                   ref_leaves["w"], ids.long())
    refs = (ref,) + torch.autograd.grad(ref, [ref_leaves[n] for n in names], g)

    leaf = {n: t[n].to(DEVICE, torch.float32 if n == "w" else DTYPE).requires_grad_()
            for n in ("x", "w1", "w2", "a1", "a2", "w")}
    tensors = variants.Tensors(leaf["x"], leaf["w1"], leaf["w2"], leaf["a1"], leaf["a2"],
                               leaf["w"], ids.to(DEVICE))
    y = variant.forward(tensors, TINY)
    outs = (y,) + torch.autograd.grad(y, [leaf[n] for n in names], g.to(DEVICE, DTYPE))
    for n, out, r in zip(["y"] + names, outs, refs):
        assert out.shape == r.shape, n
        err = _rel(out, r)
        assert err <= TOL, f"{name} {n}: rel err {err:.3g} > {TOL:g}"


def test_liger_matches_the_float64_oracle(liger):
    _check_variant("liger")


def test_liger_2call_matches_the_grove_oracle(liger):
    _check_variant("liger-2call")


def test_scattermoe_matches_the_float64_oracle(scattermoe):
    _check_variant("scattermoe")


@pytest.mark.skipif(GPU, reason="the CPU reason is what a CPU run reports")
@pytest.mark.parametrize("name", ["liger", "liger-2call", "scattermoe"])
def test_anchors_skip_off_a_gpu_with_their_reason(name):
    reason = variants.skip_reason(variants.VARIANTS_BY_NAME[name], torch.device("cpu"),
                                  torch.float32, "fwd+bwd")
    assert reason and "GPU" in reason and "TRITON_INTERPRET" in reason


def test_missing_packages_are_reported_with_how_to_get_them(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # `import` raises ImportError
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_moe", None)
    monkeypatch.setitem(sys.modules, "scattermoe", None)
    reason = anchors.liger_import_error()
    assert reason.startswith("liger-kernel not importable") and anchors.LIGER_SPEC in reason
    reason = anchors.scattermoe_import_error()
    assert reason.startswith("scattermoe not importable") and "not on PyPI" in reason


def test_scattermoe_without_the_functional_api_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "scattermoe", types.ModuleType("scattermoe"))
    reason = anchors.scattermoe_import_error()
    assert "lacks ['flatten_sort_count', 'parallel_linear']" in reason


def test_training_anchors_are_plain_variants():
    for name in variants.TRAINING_ANCHORS:
        v = variants.VARIANTS_BY_NAME[name]
        assert v.layer == "plain" and v.backward, name
