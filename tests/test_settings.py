"""The process-wide settings in one object (grove_kernels/settings.py): the backend per thread,
the value checks and the cuda fused-SwiGLU switch per process, the adjugate layout read from
GROVE_ADJUGATE_LAYOUT on every call."""
import threading

import pytest

import grove_kernels as gk
from grove_kernels.settings import Settings, settings


def test_adjugate_layout_is_read_per_call(monkeypatch):
    monkeypatch.delenv("GROVE_ADJUGATE_LAYOUT", raising=False)
    assert settings.adjugate_layout() == "sections"
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "folded")
    assert settings.adjugate_layout() == "folded"
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "sections")
    assert settings.adjugate_layout() == "sections"


@pytest.mark.parametrize("bad", ["", "Folded", "fold", "sections,folded"])
def test_unknown_adjugate_layout_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", bad)
    with pytest.raises(ValueError, match="GROVE_ADJUGATE_LAYOUT"):
        settings.adjugate_layout()


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


def test_fuse_swiglu_is_opt_in_and_process_wide(monkeypatch):
    assert Settings.fuse_swiglu is False
    monkeypatch.setattr(Settings, "fuse_swiglu", False)
    gk.settings.set_fuse_swiglu(True)
    assert settings.fuse_swiglu is True
