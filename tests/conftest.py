"""Shared pytest set-up: the `backend` and `gen` fixtures, the test tiers, the `gpu` tier
skipped where CUDA is absent, and a guard that fails a test which leaves a process-wide setting
changed.

Every test belongs to one tier (a marker, registered in pyproject.toml; docs/design.md §5):
    unit         torch backend, plan, routing, errors, API (no Triton kernel runs)
    interpreter  Triton kernels (under TRITON_INTERPRET without a GPU)
    toolchain    nvcc, SASS, Triton's AOT codegen, torch.compile, the wheel
    e2e          end to end: the reference Grove model, the transformers integration,
                 expert parallel over processes
    gpu          needs a CUDA GPU
A file's tier is in _FILE_TIERS; in other files a test run on the triton backend is
`interpreter`, on the cuda backend `gpu`, and an explicit marker wins.
"""
import os

import torch

# Without a GPU the Triton backend runs under its interpreter; it must be chosen before
# grove_kernels (and so triton) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _patch_lang_once_per_launch():
    """Triton 3.6's interpreter re-patches triton.language (inspect.getmembers over its
    modules) on every call of a @triton.jit helper inside a kernel: ~20% of the interpreter
    tier's CPU. A helper's patch is the same for the whole launch (the launch restores the
    language when it ends, and a re-patch finds nothing left to wrap), so it is applied once
    per helper and launch; the kernels run exactly as before. Other Triton versions: as is."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if not triton.__version__.startswith("3.6.") \
            or not hasattr(interpreter, "_patch_lang") or not hasattr(interpreter, "GridExecutor"):
        return
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched = []  # per running launch: the functions whose patch is in place

    def patch_once(fn):
        if patched and fn in patched[-1]:
            return None  # a helper's call: the result is not used
        scope = patch_lang(fn)
        if patched:
            patched[-1].add(fn)
        return scope

    def run(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = run


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_lang_once_per_launch()

from helpers import backend, gen, layout  # noqa: F401,E402  (fixtures shared by the test files)

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip without hypothesis
    settings = None
if settings is not None:
    # ci: derandomized (the same examples every run, no example database), sized so the
    # property tests fit the quick / interpreter tiers; dev: HYPOTHESIS_PROFILE=dev.
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=80, derandomize=True, database=None,
                              deadline=None, suppress_health_check=_slow_ok, print_blob=True)
    settings.register_profile("dev", max_examples=1000, deadline=None,
                              suppress_health_check=_slow_ok, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


TIERS = ("gpu", "toolchain", "interpreter", "e2e", "unit")  # the first that applies wins
_FILE_TIERS = {
    "test_triton_backend.py": "interpreter", "test_triton_plan.py": "interpreter",
    "test_cuda_build.py": "toolchain", "test_cuda_host_checks.py": "toolchain",
    "test_triton_codegen.py": "toolchain", "test_wheel.py": "toolchain",
    "test_api_gpu.py": "gpu", "test_cuda_ops_gpu.py": "gpu",
    "test_model.py": "e2e", "test_distributed.py": "e2e",
    "test_transformers_integration.py": "e2e",
}
_BACKEND_TIERS = {"triton": "interpreter", "cuda": "gpu"}


def _tier(item):
    marked = [t for t in TIERS if item.get_closest_marker(t) is not None]
    if marked:
        return marked[0]
    params = getattr(getattr(item, "callspec", None), "params", {})
    by_backend = [_BACKEND_TIERS[v] for k, v in params.items()
                  if k in ("backend", "name") and isinstance(v, str) and v in _BACKEND_TIERS]
    if by_backend:
        return min(by_backend, key=TIERS.index)
    return _FILE_TIERS.get(item.path.name, "unit")


def pytest_ignore_collect(collection_path, config):
    """`-m unit` (test.sh --quick) does not import the files whose tests all have another tier
    (a file's tier from _FILE_TIERS, or a backend's, never `unit`; none marks a test `unit`):
    the transformers integration's import alone costs each worker seconds."""
    if config.getoption("markexpr", "") == "unit" and collection_path.name in _FILE_TIERS:
        return True
    return None


# Under TRITON_INTERPRET a Triton kernel runs one program at a time in numpy: the interpreter
# tier's time is its number of kernel calls. There every dtype gets the same tiles
# (grove_kernels/triton/config.py), so a dtype changes only the element type of the loads and
# stores, and fp16 and bf16 run the same half-type path; a routing rule (renormalize, selection
# bias) runs in grove_topk, before the layout's kernels. The parameter sets below repeat, on
# the triton backend, a path that another set of the same test (or the test named) runs, and
# are skipped there under the interpreter (compiled Triton, on a GPU, runs them all; so does
# GROVE_TEST_ALL=1).
# What stays, per layout: every case in fp32 (T = 0 in the empty-batch tests, T = 1, odd and
# non tile multiple sizes, k = 1, S = 1, 2, 4, all tokens on one expert, co-selected groups,
# empty experts, every gradient), the half-type path on the cases listed, each routing rule.
_ROUTING_RULES = {"no_renorm", "bias", "bias_no_renorm"}
_INTERPRETER_REPEATS = {
    # test name: (which parameter sets repeat another one's path, why)
    "test_fused_grove_experts": (
        lambda p: (p["dtype"] == torch.float16 and p["case"] not in ("base", "odd_sizes"))
        or (p["dtype"] == torch.bfloat16
            and p["case"] not in ("base", "odd_sizes", "S4_k4", "coselected")),
        "half types on base, odd_sizes, S4_k4, coselected (fp16: base, odd_sizes); fp32 on all"),
    "test_grove_moe": (
        lambda p: p["case"] not in ("odd_sizes", "S1")
        and not (p["case"] == "base" and p["dtype"] == torch.float16),
        "odd_sizes and S1 in every dtype, base in fp16; the other cases' forward is test_grove_moe_grad's "
        "(which checks y) and the experts' inference kernels are test_fused_grove_experts'"),
    "test_fused_grove_experts_grad": (
        lambda p: p["dtype"] == torch.bfloat16
        and p["case"] not in ("base", "odd_sizes", "S4_k4", "coselected_k4"),
        "bf16 on base, odd_sizes, S4_k4, coselected_k4; fp32 on all"),
    "test_grove_moe_grad": (
        lambda p: (p["case"] in _ROUTING_RULES
                   and (p["layout"], p["dtype"]) not in (("folded", torch.float32),
                                                         ("sections", torch.bfloat16)))
        or (p["case"] not in _ROUTING_RULES and p["layout"] == "sections"),
        "routing rules on (folded, fp32) and (sections, bf16); base, k1, S4_k4 on folded: on "
        "sections their experts' gradients are test_fused_grove_experts_grad's (same cases, "
        "both dtypes) and the routing kernels do not depend on the layout"),
    "test_fused_experts_grad": (
        lambda p: p["dtype"] == torch.bfloat16
        and p["case"] not in ("base", "odd_sizes", "weight_on_input_k2", "expert_map"),
        "bf16 on base, odd_sizes, weight_on_input_k2, expert_map; fp32 on all"),
    "test_fused_experts": (
        lambda p: p["dtype"] == torch.float16 and p["case"] != "base",
        "fp16 on base; fp32 and bf16 on all"),
}


def _interpreter_repeat(item):
    """The reason `item` repeats another parameter set's path under the interpreter, or None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("backend") != "triton" or os.environ.get("TRITON_INTERPRET") != "1" \
            or os.environ.get("GROVE_TEST_ALL") == "1":
        return None
    rule = _INTERPRETER_REPEATS.get(getattr(item, "originalname", item.name))
    if rule is None or not rule[0](params):
        return None
    return "repeats a path under the Triton interpreter (GROVE_TEST_ALL=1 runs it): " + rule[1]


# Files whose module fixture is a long subprocess (Triton's sm_90 codegen, `pip wheel`, the
# expert-parallel process groups): under `--dist loadgroup` (scripts/test.sh) one xdist worker
# runs all of a file's tests, so that fixture runs once rather than once per worker.
_ONE_WORKER = ("test_triton_codegen.py", "test_wheel.py", "test_distributed.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.path.name in _ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
        tier = _tier(item)
        item.add_marker(tier)
        if tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(skip)
        repeat = _interpreter_repeat(item) if tier == "interpreter" else None
        if repeat:
            item.add_marker(pytest.mark.skip(reason=repeat))


def _process_settings():
    import grove_kernels as gk

    return {"grove_kernels.value_checks_enabled()": gk.value_checks_enabled(),
            "grove_kernels.get_backend()": gk.get_backend(),
            "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "torch.get_default_dtype()": torch.get_default_dtype()}


def _restore(settings):
    import grove_kernels as gk

    gk.set_value_checks(settings["grove_kernels.value_checks_enabled()"])
    gk.set_backend(settings["grove_kernels.get_backend()"])
    torch.backends.cuda.matmul.allow_tf32 = settings["torch.backends.cuda.matmul.allow_tf32"]
    torch.set_default_dtype(settings["torch.get_default_dtype()"])


@pytest.fixture(autouse=True)
def _settings_restored():
    """Tests share one process: a setting one of them leaves changed decides what later files
    test. Blame the test that changed it, and put the setting back."""
    before = _process_settings()
    yield
    after = _process_settings()
    if after != before:
        _restore(before)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"the test left process-wide settings changed (before, after): {changed}",
                    pytrace=False)
