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


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        tier = _tier(item)
        item.add_marker(tier)
        if tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(skip)


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
