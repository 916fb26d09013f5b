"""Backend registry: which implementations exist here and which one a call uses.

A call runs three stages (DESIGN §3):

    routing   logits -> (weights, ids)        grove_kernels/routing.py  | triton/routing.py
    plan      (ids, weights) -> Plan          grove_kernels/plan.py     | triton/plan.py
    experts   Plan, x, weights -> y           reference.py (torch) | triton/backend.py |
                                              cuda/backend.py

The configured backend name ("auto" by default, per thread) picks the experts stage; routing
and plan run in Triton for every backend but `torch` wherever Triton runs on the inputs'
device, in torch otherwise. A backend is described by a light module (no kernels imported):

    torch   grove_kernels.reference     triton  grove_kernels.triton     cuda  grove_kernels.cuda

each with is_available(), supports(x, weights) -> None or the reason it cannot run a call, and
IMPLEMENTATION, the module with forward / backward (protocol in experts.py).

`auto` on a GPU takes the backend measured fastest for the device, dtype and token count
(auto_table.py), else the first of cuda, triton that supports the call; on a CPU, torch.
Resolution reads only metadata, so torch.compile folds it into the graph (the token-count
bucket becomes a guard on T).
"""
import contextlib
import importlib
import os
import threading

import torch

from . import auto_table

BACKEND_NAMES = ("torch", "triton", "cuda")
_DESCRIPTORS = {
    "torch": "grove_kernels.reference",
    "triton": "grove_kernels.triton",
    "cuda": "grove_kernels.cuda",
}
_STAGES = {  # routing and plan implementations: (routing module, plan module)
    "torch": ("grove_kernels.routing", "grove_kernels.plan"),
    "triton": ("grove_kernels.triton.routing", "grove_kernels.triton.plan"),
}

_state = threading.local()
_default = os.environ.get("GROVE_KERNELS_BACKEND", "auto")
_descriptors = {}


def descriptor(name):
    """The descriptor module of backend `name`, or None when it cannot run in this process."""
    if name not in _descriptors:
        try:
            module = importlib.import_module(_DESCRIPTORS[name])
            ok = module.is_available()
        except ImportError:
            module, ok = None, False
        _descriptors[name] = module if ok else None
    return _descriptors[name]


def implementation(name):
    """The module with the experts stage (forward, backward) of backend `name`."""
    return importlib.import_module(descriptor(name).IMPLEMENTATION)


def available_backends():
    """Names of the backends usable in this process, in order of preference for `auto`."""
    return [name for name in BACKEND_NAMES if descriptor(name) is not None]


def _check_name(name):
    if not isinstance(name, str) or name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend: expected one of {BACKEND_NAMES + ('auto',)}, got {name!r}")
    if name != "auto" and descriptor(name) is None:
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


def _auto_candidates(device, dtype, num_tokens):
    if device.type != "cuda":
        return ["torch"]
    props = torch.cuda.get_device_properties(device)
    measured = auto_table.lookup(props.name, dtype, num_tokens)
    fallback = ["cuda", "triton", "torch"]
    return ([measured] if measured else []) + [n for n in fallback if n != measured]


def resolve(x, weights=(None, None, None, None), name=None):
    """The concrete backend for a call on x [T, H] with weights (w1, w2, a1, a2): the configured
    one (ValueError when it cannot run the call), or the choice of `auto`."""
    name = get_backend() if name is None else name
    if name != "auto":
        _check_name(name)
        reason = descriptor(name).supports(x, weights)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return name
    for candidate in _auto_candidates(x.device, x.dtype, x.shape[0]):
        module = descriptor(candidate)
        if module is not None and module.supports(x, weights) is None:
            return candidate
    return "torch"


def stage(name, device):
    """(routing module, plan module) for a call of backend `name` on `device`."""
    triton = descriptor("triton")
    use_triton = name != "torch" and triton is not None and (
        device.type == "cuda" or triton.runs_on_cpu)
    routing, plan = _STAGES["triton" if use_triton else "torch"]
    return importlib.import_module(routing), importlib.import_module(plan)


def resolve_routing(device):
    """The backend whose routing and plan stage a call on `device` uses."""
    name = get_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and descriptor("triton") else "torch"
    _check_name(name)
    if device.type != "cuda" and not descriptor(name).runs_on_cpu:
        raise ValueError(f"backend: {name!r} does not run on {device}; use 'torch' or 'auto'")
    return name
