"""The process-wide settings in one object (grove_kernels/settings.py): the backend per thread,
the value checks and the cuda fused-SwiGLU switch per process, the adjugate layout read from
GROVE_ADJUGATE_LAYOUT on every call."""
import threading

import pytest

import grove_kernels as gk
from grove_kernels import backends
from grove_kernels.settings import Settings, settings


def test_adjugate_layout_is_read_per_call(monkeypatch):
    monkeypatch.delenv("GROVE_ADJUGATE_LAYOUT", raising=False)
    assert backends.requested_layout() is None  # unset: the backend's default_layout
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")
    assert backends.requested_layout() == "folded"
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "sections")
    assert backends.requested_layout() == "sections"


@pytest.mark.parametrize("bad", ["", "Folded", "fold", "sections,folded"])
def test_unknown_adjugate_layout_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", bad)
    with pytest.raises(ValueError, match="GROVE_ADJUGATE_LAYOUT"):
        backends.requested_layout()


def test_backend_is_per_thread_value_checks_per_process():
    seen = {}

    def other():
        seen["backend"] = gk.get_backend()
        seen["checks"] = gk.value_checks_enabled()

    with gk.use_backend("torch"), gk.settings.value_checks(False):
        assert settings.backend == "torch" and settings.value_checks is False
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == {"backend": Settings.backend, "checks": False}


def test_fuse_swiglu_is_auto_and_process_wide(monkeypatch):
    import grove_kernels.settings as settings_module

    assert Settings.fuse_swiglu == "auto"  # unset GROVE_CUDA_FUSE_SWIGLU
    assert settings_module.FUSE_SWIGLU_AUTO is False  # the plain GEMM-1 until measured faster
    monkeypatch.setattr(Settings, "fuse_swiglu", "auto")
    gk.settings.set_fuse_swiglu(True)
    assert settings.fuse_swiglu is True
    gk.settings.set_fuse_swiglu("0")
    assert settings.fuse_swiglu is False
    gk.settings.set_fuse_swiglu("auto")
    assert settings.fuse_swiglu == "auto"
    with pytest.raises(ValueError, match="set_fuse_swiglu"):
        gk.settings.set_fuse_swiglu("yes")


@pytest.mark.parametrize("mode,auto,fused", [("0", True, False), ("1", False, True),
                                             ("auto", False, False), ("auto", True, True)])
def test_fused_gemm1_is_decided_per_call(monkeypatch, mode, auto, fused):
    """GROVE_CUDA_FUSE_SWIGLU 0 / 1 override; auto follows FUSE_SWIGLU_AUTO; a training
    forward never fuses (it saves h)."""
    import grove_kernels.settings as settings_module

    monkeypatch.setattr(Settings, "fuse_swiglu",
                        settings_module._fuse_swiglu_mode(mode, "GROVE_CUDA_FUSE_SWIGLU"))
    monkeypatch.setattr(settings_module, "FUSE_SWIGLU_AUTO", auto)
    assert settings_module.fused_gemm1(train=False) is fused
    assert settings_module.fused_gemm1(train=True) is False


def test_fuse_swiglu_variable_is_read_at_import():
    import subprocess
    import sys

    # One process, the module imported afresh per value: each process start imports torch.
    code = """
import importlib, os, sys
for value in ("1", "", "yes"):
    os.environ["GROVE_CUDA_FUSE_SWIGLU"] = value
    sys.modules.pop("grove_kernels.settings", None)
    try:
        print(importlib.import_module("grove_kernels.settings").settings.fuse_swiglu)
    except Exception as exc:
        print("refused:", "GROVE_CUDA_FUSE_SWIGLU" in str(exc))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split("\n")[:3] == ["True", "auto", "refused: True"], \
        proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("default", ["sections", "folded"])
def test_unset_layout_takes_the_backends_default(monkeypatch, default):
    """Without GROVE_ADJUGATE_LAYOUT a call runs its backend's default_layout (measured per
    backend); the variable overrides it."""
    import torch

    torch_backend = backends.BACKENDS["torch"]
    torch_backend.load()  # binds the stages on the object; the spies replace them after
    monkeypatch.setattr(type(torch_backend), "default_layout", default)
    built = []
    for stage in ("build_plan", "build_folded_plan"):
        real = getattr(torch_backend, stage)
        monkeypatch.setattr(torch_backend, stage,
                            lambda *a, _s=stage, _r=real: built.append(_s) or _r(*a))
    g = torch.Generator().manual_seed(0)
    T, H, E, k, I, S, Ia = 5, 8, 4, 2, 4, 2, 2
    x = torch.randn(T, H, generator=g)
    w1, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    a1, a2 = torch.randn(E // S, 2 * Ia, H, generator=g), torch.randn(E // S, H, Ia, generator=g)
    logits = torch.randn(T, E, generator=g)
    monkeypatch.delenv("GROVE_ADJUGATE_LAYOUT", raising=False)
    with gk.use_backend("torch"):
        gk.grove_moe(x, logits, w1, w2, a1, a2, top_k=k, group_size=S)
        assert built == ["build_folded_plan" if default == "folded" else "build_plan"]
        other = "sections" if default == "folded" else "folded"
        monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", other)
        gk.grove_moe(x, logits, w1, w2, a1, a2, top_k=k, group_size=S)
    assert built[1] == ("build_folded_plan" if other == "folded" else "build_plan")


def test_triton_defaults_to_the_folded_layout():
    assert backends.BACKENDS["triton"].default_layout == "folded"
    assert backends.BACKENDS["cuda"].default_layout == "sections"
