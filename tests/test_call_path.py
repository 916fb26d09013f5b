"""One forward call goes down the layers once (docs/design.md §3.1): public API -> op -> plan ->
backend -> kernels, traced with sys.setprofile on the torch and the triton backends.

A file of grove_kernels/ is *entered* by a call whose nearest grove_kernels caller lies in
another file (a call within a file, and a return, enter nothing). Triton kernel bodies
(@triton.jit functions) are device code, emulated by the interpreter on a CPU: not traced.

    entries  the files in order of entry, consecutive repeats merged
    asserted the backend is resolved once; no file appears twice in `entries`; at most 10 files
"""
import os
import sys

import pytest
import torch

import grove_kernels as gk
from grove_kernels import backends

ROOT = os.path.dirname(os.path.abspath(gk.__file__)) + os.sep
MAX_FILES = 10


def _device_code():
    """(file, name) of the Triton kernels and their @triton.jit helpers: the interpreter runs
    a rewritten copy of each (triton's FunctionRewriter: a new code object, same file, name and
    lines), so a code object is matched by where it is defined, not by identity."""
    import importlib
    import pkgutil

    import grove_kernels.triton as pkg

    codes = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("tune", "codegen_check"):
            continue
        module = importlib.import_module(f"grove_kernels.triton.{info.name}")
        for value in vars(module).values():
            fn = getattr(value, "fn", None)
            if type(value).__module__.startswith("triton") and hasattr(fn, "__code__"):
                codes.add(_key(fn.__code__))
    return codes


def _key(code):
    return code.co_filename, code.co_name


def trace_forward(name, call):
    """(file entries in order, calls of backends.resolve) of one call under backend `name`."""
    skip = _device_code() if name == "triton" else set()
    entries, resolves = [], []

    def grove_file(frame):
        while frame is not None:
            f = frame.f_code.co_filename
            if f.startswith(ROOT) and _key(frame.f_code) not in skip:
                return f
            frame = frame.f_back
        return None

    def profile(frame, event, arg):
        if event != "call" or _key(frame.f_code) in skip:
            return
        f = frame.f_code.co_filename
        if not f.startswith(ROOT):
            return
        if frame.f_code is backends.resolve.__code__:
            resolves.append(frame.f_code.co_name)
        if grove_file(frame.f_back) != f:
            rel = f[len(ROOT):]
            if not entries or entries[-1] != rel:
                entries.append(rel)

    with gk.use_backend(name):
        call()  # warm: first-use imports and kernel compilation are not the call path
        sys.setprofile(profile)
        try:
            call()
        finally:
            sys.setprofile(None)
    return entries, resolves


def _layer(gen, dtype=torch.float32):
    T, H, E, k, I, S, Ia = 7, 16, 4, 2, 8, 2, 8
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x, w1, w2, a1, a2 = r(T, H), r(E, 2 * I, H), r(E, H, I), r(E // S, 2 * Ia, H), r(E // S, H, Ia)
    w, ids = gk.grove_topk(torch.randn(T, E, generator=gen), k)
    return lambda: gk.fused_grove_experts(x, w1, w2, a1, a2, w, ids, group_size=S)


def _check(entries, resolves):
    assert resolves == ["resolve"], f"backend resolved {len(resolves)} times"
    repeated = sorted({f for f in entries if entries.count(f) > 1})
    assert not repeated, f"files re-entered after the call moved on: {repeated}; path {entries}"
    assert len(entries) <= MAX_FILES, f"{len(entries)} files entered: {entries}"


def test_torch_forward_goes_down_the_layers_once(gen):
    entries, resolves = trace_forward("torch", _layer(gen))
    _check(entries, resolves)
    assert entries[:3] == ["api.py", "_validate.py", "ops.py"]
    assert entries[-2:] == ["experts.py", "reference.py"]


TOP_LAYERS = ("api.py", "_validate.py", "ops.py", "backends.py", "settings.py", "plan.py",
              "experts.py")


@pytest.mark.interpreter
@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
@pytest.mark.parametrize("layout", ["sections", "folded"])
def test_triton_forward_enters_the_layers_above_the_kernels_once(gen, monkeypatch, layout):
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", layout)
    entries, resolves = trace_forward("triton", _layer(gen))
    assert resolves == ["resolve"]
    for layer in TOP_LAYERS:
        assert entries.count(layer) <= 1, f"{layer} re-entered; path {entries}"
    top = [f for f in entries if f in TOP_LAYERS]
    # The folded plan is built in plan_folded.py (not a layer above the kernels: the folded
    # kernels read its fields).
    plan = ["plan.py"] if layout == "sections" else []
    assert top == ["api.py", "_validate.py", "ops.py", "backends.py", "settings.py", *plan,
                   "experts.py"], entries


@pytest.mark.interpreter
@pytest.mark.skipif("triton" not in gk.available_backends(), reason="triton unavailable")
@pytest.mark.parametrize("layout", [None, "sections", "folded"])
def test_triton_forward_goes_down_the_layers_once(gen, monkeypatch, layout):
    """triton's default layout (folded) and each named one: the plan in triton/plan.py, the
    host side of the experts stage in triton/backend.py and config.py, the kernels launched
    from there."""
    if layout is not None:
        monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", layout)
    entries, resolves = trace_forward("triton", _layer(gen))
    _check(entries, resolves)
    assert entries[-3:] == ["experts.py", "triton/backend.py", "triton/config.py"], entries
