"""Shared pieces of the API tests: seeded inputs, the docs/design.md §5 error measure, backends.

    make_grove(T, H, E, I, Ia, S, dtype) -> dict x [T, H], w1 [E, 2I, H], w2 [E, H, I],
                                            a1 [G, 2Ia, H], a2 [G, H, Ia]  (outputs O(1))
    routing(T, E, k, kind)               -> topk_weights fp32 [T, k], topk_ids int64 [T, k]
    router_logits(T, E)                  -> [T, E] with well separated values, so that fp32,
                                            bf16 and fp64 all choose the same experts
    rel_err(out, ref)                    -> ||out - ref|| / ||ref|| in fp64; inf on NaN/Inf
    to64(t)                              -> fp64 CPU leaf copy (requires_grad optional)
"""
import math
import os
import zlib

import pytest
import torch

import grove_kernels as gk

# GROVE_TEST_BACKENDS=a,b narrows the backends under test (scripts/gpu_check.sh runs the cuda
# backend's tests in their own process: a CUDA error poisons its context, not the others').
_only = [b for b in os.environ.get("GROVE_TEST_BACKENDS", "").split(",") if b]
BACKENDS = [b for b in gk.available_backends() if b != "auto" and (not _only or b in _only)]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _runs_on_cpu(name):
    try:
        with gk.use_backend(name):
            gk.grove_topk(torch.randn(2, 4), 2)
        return True
    except ValueError:
        return False


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every available backend, each test body run under `gk.use_backend(name)` on the CPU."""
    if not _runs_on_cpu(request.param):
        pytest.skip(f"backend {request.param!r} does not run on the CPU (see test_api_gpu.py)")
    with gk.use_backend(request.param):
        yield request.param


LAYOUTS = ("sections", "folded")


@pytest.fixture(params=LAYOUTS)
def layout(request, monkeypatch):
    """Both adjugate layouts: the test body runs with GROVE_ADJUGATE_LAYOUT set to each."""
    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", request.param)
    return request.param


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per test, reproducible per run.
    The adjugate layout is left out of the id: both layouts see the same inputs."""
    nodeid = request.node.nodeid
    callspec = getattr(request.node, "callspec", None)
    layout = callspec.params.get("layout") if callspec is not None else None
    if layout is not None:
        head, sep, ids = nodeid.partition("[")
        parts = ids.rstrip("]").split("-")
        parts.remove(layout)
        nodeid = head + (sep + "-".join(parts) + "]" if parts else "")
    return torch.Generator().manual_seed(zlib.crc32(nodeid.encode()))


def randn(*shape, gen, scale=1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def make_grove(T, H, E, I, Ia, S, gen, dtype=torch.float32, device="cpu"):
    """Weights scaled by fan-in**-0.5 so that every layer output is O(1)."""
    G = E // S
    return dict(
        x=randn(T, H, gen=gen, dtype=dtype, device=device),
        w1=randn(E, 2 * I, H, gen=gen, scale=H ** -0.5, dtype=dtype, device=device),
        w2=randn(E, H, I, gen=gen, scale=I ** -0.5, dtype=dtype, device=device),
        a1=randn(G, 2 * Ia, H, gen=gen, scale=H ** -0.5, dtype=dtype, device=device),
        a2=randn(G, H, Ia, gen=gen, scale=Ia ** -0.5, dtype=dtype, device=device),
    )


def routing(T, E, k, gen, kind="random", S=2, device="cpu"):
    """Distinct ids per token; weights positive, not normalized (any weights are legal).

    kind: random      uniformly random distinct experts
          one_expert  slot 0 of every token is the same expert (all tokens on it)
          coselected  whole groups: each token's ids are all S experts of k // S groups
          sparse      ids only from a few experts, leaving experts and groups empty
    """
    scores = torch.rand(T, E, generator=gen)
    if kind == "random":
        ids = scores.argsort(dim=1)[:, :k]
    elif kind == "one_expert":
        hot = E // 2 - 1
        scores[:, hot] = -1.0  # sorts first
        ids = scores.argsort(dim=1)[:, :k]
    elif kind == "coselected":
        assert k % S == 0
        G = E // S
        groups = torch.rand(T, G, generator=gen).argsort(dim=1)[:, : k // S]
        ids = (groups[:, :, None] * S + torch.arange(S)).reshape(T, k)
        shuffle = torch.rand(T, k, generator=gen).argsort(dim=1)
        ids = ids.gather(1, shuffle)
    elif kind == "sparse":
        allowed = torch.randperm(E, generator=gen)[: max(k, E // 3)]
        scores = torch.rand(T, allowed.numel(), generator=gen)
        ids = allowed[scores.argsort(dim=1)[:, :k]]
    else:
        raise AssertionError(kind)
    weights = torch.rand(T, k, generator=gen) * 0.9 + 0.1
    return weights.to(device), ids.to(device)


def router_logits(T, E, gen, dtype=torch.float32, device="cpu"):
    """A shuffled grid in [-2, 2] (step 4/E) plus jitter of ±0.1 step.

    Neighbours stay >= 0.8 step apart after rounding to bf16, and sigmoid does not saturate,
    so the selection cannot flip between precisions: the tests check values, not tie-breaks.
    """
    step = 4.0 / E
    grid = torch.rand(T, E, generator=gen).argsort(dim=1).double() - E / 2
    jitter = (torch.rand(T, E, generator=gen, dtype=torch.float64) - 0.5) * 0.2
    return ((grid + jitter) * step).to(dtype=dtype, device=device)


def to64(t, requires_grad=False):
    if t is None:
        return None
    out = t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype)
    return out.requires_grad_(requires_grad) if t.is_floating_point() else out


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in fp64 on the CPU; inf when out has NaN/Inf (never passes)."""
    assert tuple(out.shape) == tuple(ref.shape), (tuple(out.shape), tuple(ref.shape))
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(o).all():
        return math.inf
    den = r.norm().item()
    num = (o - r).norm().item()
    # A reference that is zero up to fp64 rounding (e.g. d logits when k = 1 and renormalized)
    # has no scale: measure the absolute error instead (inputs here are O(1)).
    return num / den if den > 1e-12 else num


def tolerance(dtype, device="cpu"):
    """docs/design.md §5: fp32 1e-4 (IEEE fp32, torch's default; 1e-3 where the user allowed tf32
    with torch.backends.cuda.matmul.allow_tf32 and the call runs on a GPU), half types 2e-2."""
    if dtype == torch.float32:
        tf32 = torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return 1e-3 if tf32 else 1e-4
    return 2e-2


def assert_close(out, ref, what, dtype=None, device=None, torch_out=None):
    """Rel err within docs/design.md §5 tolerance; in half types also <= 2x the torch backend's
    error."""
    dtype = dtype if dtype is not None else out.dtype
    device = device if device is not None else out.device
    bound = tolerance(dtype, device)
    err = rel_err(out, ref)
    extra = ""
    if torch_out is not None and dtype != torch.float32:
        torch_err = rel_err(torch_out, ref)
        # tiny floor: a backend may round differently where the torch one happens to be exact
        bound = min(bound, max(2 * torch_err, 1e-5))
        extra = f" (torch backend: {torch_err:.3e})"
    assert err <= bound, f"{what}: rel err {err:.3e} > {bound:.3e}{extra}"


def sorted_routing(weights, ids):
    """Rows ordered by expert id, so that routing is compared independently of slot order."""
    ids64 = ids.long().cpu()
    order = ids64.argsort(dim=1)
    return weights.detach().cpu().double().gather(1, order), ids64.gather(1, order)


def backend_reference(fn, backend):
    """fn() under the torch backend when `backend` is another one, else None (see assert_close)."""
    if backend == "torch":
        return None
    with gk.use_backend("torch"):
        return fn()
