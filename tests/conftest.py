"""Shared pytest set-up: the `backend` and `gen` fixtures, the `gpu` marker that skips where
CUDA is absent, and a guard that fails a test which leaves a process-wide setting changed."""
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
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
