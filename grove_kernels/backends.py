"""Backend registry: which implementations exist on this machine and which one a call uses.

A backend is a module exposing `topk`, `experts_forward` and `experts_backward` with the
signatures of the ops in ops.py. The configured name ("auto" by default) is resolved per call
from the device (and dtype) of the inputs: `cuda` on sm_90 when grove_kernels._C is built, the
backend is marked for `auto` (cuda.AUTO: only once GPU-tested) and the dtype is bf16/fp16, else
`triton` on a GPU, else `torch`.
"""
import contextlib
import importlib
import os
import threading

import torch

BACKEND_NAMES = ("torch", "triton", "cuda")
_MODULES = {
    "torch": "grove_kernels.reference",
    "triton": "grove_kernels.triton.backend",
    "cuda": "grove_kernels.cuda.backend",
}

_state = threading.local()
_default = os.environ.get("GROVE_KERNELS_BACKEND", "auto")
_loaded = {}


def _load(name):
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            ok = getattr(module, "is_available", lambda: True)()
        except ImportError:
            module, ok = None, False
        _loaded[name] = module if ok else None
    return _loaded[name]


def available_backends():
    """Names of the backends usable in this process, in order of preference for `auto`."""
    return [name for name in BACKEND_NAMES if _load(name) is not None]


def _check_name(name):
    if not isinstance(name, str) or name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend: expected one of {BACKEND_NAMES + ('auto',)}, got {name!r}")
    if name != "auto" and _load(name) is None:
        raise ValueError(
            f"backend: {name!r} is not available here (available: {available_backends()})"
        )


def get_backend():
    """The configured backend name (possibly "auto") for the current thread."""
    return getattr(_state, "name", _default)


def set_backend(name):
    """Select the backend for later calls in this thread: torch, triton, cuda or auto."""
    _check_name(name)
    _state.name = name


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the enclosed calls with backend `name`."""
    _check_name(name)
    previous = get_backend()
    _state.name = name
    try:
        yield
    finally:
        _state.name = previous


def resolve(device, dtype=None):
    """Concrete backend name for a call whose tensors live on `device` (activations `dtype`)."""
    name = get_backend()
    if name != "auto":
        module = _load(name)
        if device.type != "cpu" or getattr(module, "runs_on_cpu", name == "torch"):
            return name
        raise ValueError(f"backend: {name!r} does not run on {device}; use 'torch' or 'auto'")
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        cuda = _load("cuda")
        if (major == 9 and cuda is not None and cuda.AUTO
                and (dtype is None or dtype in cuda.DTYPES)):
            return "cuda"
        if _load("triton") is not None:
            return "triton"
    return "torch"


def module(name):
    """The implementation module of a resolved backend name."""
    return _load(name)
