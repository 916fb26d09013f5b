"""The backends: one object per backend, in one registry, and the choice a call makes.

A call runs three stages (docs/design.md §3):

    routing   logits -> (weights, ids)        Backend.topk
    plan      (ids, weights) -> Plan          Backend.build_plan
    experts   Plan, x, weights -> y           Backend.forward / Backend.backward

    BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend(), "cuda": CudaBackend()}

A Backend says whether it can run here (available) and a call (supports: None, or the reason,
naming the argument); its four stage functions come from its implementation modules, imported
the first time the backend runs a call (`load`), so importing grove_kernels imports neither
Triton's kernels nor the CUDA extension. The torch backend runs the torch reference stages
(routing.py, plan.py, reference.py); triton its Triton kernels (triton/); cuda the Triton
routing and plan where Triton runs (else the torch ones) and its CUTLASS experts stage (cuda/).

A call is resolved once, before its op runs (resolve: the configured name, or the choice of
`auto`); the op receives the name and takes the object with `get`, which is the one place that
refuses a backend that cannot run the call (a kernel given what it cannot run would read out
of bounds, and the ops are public: torch.ops.grove.*).

`auto` on a GPU takes the backend measured fastest for the device, dtype, layer shape, pass
(inference or training) and token count, else the first of cuda, triton that supports the
call; on a CPU, torch. The measurements: one JSON file per device in
grove_kernels/auto_tables/ (named like vLLM's per-device config files:
`device_name=NVIDIA_H200.json`), written from bench records by
`python -m grove_kernels.tools.fill_auto_table bench/results/*.json`:

    {"device": "NVIDIA H200", "sources": [record file, commit, date, ...],
     "tables": [{"dtype": "bfloat16", "shape": {"H": .., "I": .., "Ia": .., "E": .., "k": ..},
                 "pass": "inference" | "training",
                 "buckets": [[largest T, backend], ..., [null, backend]],
                 "measured": {T: {backend: µs}}}]}

The pass is `inference` (forward only: timed `fwd` rows) or `training` (a forward that saves
for a backward: timed `fwd+bwd` rows, since the backward runs on the forward's backend). A
bucket's bound is the geometric mean of the two measured token counts it separates; beyond the
measured range the nearest bucket holds. A device, dtype, shape or pass not measured gives
None: resolution then takes the first of cuda, triton that supports the call.

Resolution reads only metadata, so torch.compile folds it into the graph (the token-count
bucket becomes a guard on T).
"""
import contextlib
import functools
import json
import os

import torch

from .settings import ADJUGATE_LAYOUTS, LAYOUT_VARIABLE, settings


class Backend:
    """The protocol of a backend (the experts-stage contract is in experts.py).

        name                     "torch" | "triton" | "cuda"
        runs_on_cpu              its kernels run on CPU tensors in this process
        available()              it can run in this process
        supports(x, weights)     None, or why it cannot run a call on x [T, H] with
                                 weights (w1, w2, a1 | None, a2 | None): reads metadata only
        topk(logits, top_k, renormalize, selection_bias) -> (weights [T, k], ids [T, k])
        build_plan(topk_ids, topk_weights, num_experts, group_size, adjugate_scale,
                   expert_map) -> Plan
        build_folded_plan(same arguments, group_size >= 1) -> FoldedPlan (plan_folded.py)
        layouts                  the adjugate layouts its experts stage runs
        forward(x, weights, plan, weight_on_input, y, act)
        backward(dy, x, weights, plan, weight_on_input, act, grads) -> d row weight [R]
                                 (a FoldedPlan: (d row weight [R], d leader weight [R]))

    The four stage functions are bound on the object by `load` (a plain attribute afterwards);
    until then the methods below load and delegate.
    """

    name = None
    runs_on_cpu = False
    layouts = ("sections",)
    # The layout a call gets when GROVE_ADJUGATE_LAYOUT is unset: the one measured faster on
    # this backend (bench/results/h200_2026-12-04_layouts.md).
    default_layout = "sections"
    _STAGES = ("topk", "build_plan", "build_folded_plan", "forward", "backward")

    def available(self):
        return True

    def supports(self, x, weights):
        return None

    def stages(self):
        """{stage name: function} of the four stages (imports the implementation)."""
        raise NotImplementedError

    def load(self):
        if "forward" not in self.__dict__:
            self.__dict__.update(self.stages())
        return self

    def topk(self, *args):
        return self.load().topk(*args)

    def build_plan(self, *args):
        return self.load().build_plan(*args)

    def build_folded_plan(self, *args):
        return self.load().build_folded_plan(*args)

    def forward(self, *args):
        return self.load().forward(*args)

    def backward(self, *args):
        return self.load().backward(*args)

    def __repr__(self):
        return f"<grove_kernels backend {self.name!r}>"


def _torch_stages():
    from . import plan, plan_folded, reference, routing

    return dict(topk=routing.topk, build_plan=plan.build_plan,
                build_folded_plan=plan_folded.build_folded_plan, forward=reference.forward,
                backward=reference.backward)


def _triton_stages():
    from .triton import backend, plan, routing

    return dict(topk=routing.topk, build_plan=plan.build_plan,
                build_folded_plan=plan.build_folded_plan, forward=backend.forward,
                backward=backend.backward)


def unsupported(backend, x, weights, dtypes, multiple_of=1):
    """The common part of a kernel backend's supports(): the reason it cannot run a call with
    x's dtype, non-contiguous weights (kernels bake the unit stride of their last dimension
    into their loads) or sizes H, I, Ia not multiples of `multiple_of`; or None."""
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return (f"hidden_states: the {backend} backend supports {names}, got "
                f"{str(x.dtype).replace('torch.', '')}")
    for name, w in zip(("w1", "w2", "a1", "a2"), weights):
        if w is not None and not w.is_contiguous():
            return (f"{name}: the {backend} backend needs contiguous weights, got strides "
                    f"{w.stride()}")
    if multiple_of > 1 and weights[0] is not None:
        sizes = {"H": x.shape[1], "I": weights[0].shape[1] // 2}
        if weights[2] is not None:
            sizes["Ia"] = weights[2].shape[1] // 2
        odd = {k: v for k, v in sizes.items() if v % multiple_of}
        if odd:
            return (f"w1: the {backend} backend needs H, I and Ia multiples of {multiple_of}, "
                    f"got {odd}")
    return None


class TorchBackend(Backend):
    """The readable reference: vectorized torch on any device, float64 included."""

    name = "torch"
    runs_on_cpu = True
    layouts = ("sections", "folded")

    def stages(self):
        return _torch_stages()


class TritonBackend(Backend):
    """Triton kernels on any GPU Triton supports; on the CPU under TRITON_INTERPRET=1 (set
    before grove_kernels is imported), which is how CI tests them."""

    name = "triton"
    # H200, 2026-12-04: folded 0.86-1.00x the sections layout's forward at every T.
    default_layout = "folded"
    layouts = ("sections", "folded")
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self):
        from .triton import INTERPRET  # the package's __init__ only: no kernel is imported

        self.runs_on_cpu = INTERPRET

    def available(self):
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return self.runs_on_cpu or torch.cuda.is_available()

    def supports(self, x, weights):
        if x.device.type != "cuda" and not self.runs_on_cpu:
            return f"hidden_states: the triton backend runs on CUDA devices, got {x.device}"
        reason = unsupported("triton", x, weights, self.DTYPES)
        if reason is not None and x.dtype == torch.float64:
            reason += "; use the torch backend for float64"
        return reason

    def stages(self):
        return _triton_stages()


class CudaBackend(Backend):
    """CUTLASS grouped GEMMs for sm_90a and CUDA row kernels (grove_kernels._C, from csrc/);
    routing and plan in Triton where it runs."""

    name = "cuda"
    layouts = ("sections", "folded")

    def available(self):
        try:
            from .cuda import ext
        except ImportError:
            return False
        return ext.is_available()

    def supports(self, x, weights):
        if x.device.type != "cuda" or torch.cuda.get_device_properties(x.device).major != 9:
            return f"hidden_states: the cuda backend runs on sm_90 GPUs (Hopper), got {x.device}"
        from .cuda.ext import DTYPES

        # 16-byte TMA rows: H, I and Ia multiples of 8 elements.
        return unsupported("cuda", x, weights, DTYPES, multiple_of=8)

    def stages(self):
        from .cuda import backend

        routing_plan = _triton_stages() if _available("triton") else _torch_stages()
        return dict(routing_plan, forward=backend.forward, backward=backend.backward)


BACKENDS = {b.name: b for b in (TorchBackend(), TritonBackend(), CudaBackend())}
BACKEND_NAMES = tuple(BACKENDS)
_available_cache = {}


def _available(name):
    if name not in _available_cache:
        _available_cache[name] = BACKENDS[name].available()
    return _available_cache[name]


def available_backends():
    """Names of the backends usable in this process, in order of preference for `auto`."""
    return [name for name in BACKEND_NAMES if _available(name)]


def _check_name(name):
    if not isinstance(name, str) or name not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend: expected one of {BACKEND_NAMES + ('auto',)}, got {name!r}")
    if name != "auto" and not _available(name):
        raise ValueError(
            f"backend: {name!r} is not available here (available: {available_backends()})"
        )


def get_backend():
    """The configured backend name (possibly "auto") for the current thread."""
    return settings.backend


def set_backend(name):
    """Select the backend for later calls in this thread: torch, triton, cuda or auto."""
    _check_name(name)
    settings.backend = name


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the enclosed calls with backend `name`."""
    _check_name(name)
    previous = settings.backend
    settings.backend = name
    try:
        yield
    finally:
        settings.backend = previous


# ---- auto's measured tables -----------------------------------------------------------------

TABLES_DIR = os.path.join(os.path.dirname(__file__), "auto_tables")
PASSES = ("inference", "training")


def file_name(device_name):
    return "device_name=" + device_name.replace(" ", "_") + ".json"


@functools.lru_cache(maxsize=None)
def _tables(device_name):
    try:
        with open(os.path.join(TABLES_DIR, file_name(device_name))) as f:
            return json.load(f)["tables"]
    except FileNotFoundError:
        return []


def shape_of(H, I, Ia, E, k):  # noqa: E741
    return {"H": H, "I": I, "Ia": Ia, "E": E, "k": k}


def lookup(device_name, dtype, shape, training, num_tokens):
    """The measured backend for this call, or None when nothing was measured for it."""
    dtype_name = str(dtype).replace("torch.", "")
    want = PASSES[bool(training)]
    for table in _tables(device_name):
        if (table["dtype"], table["pass"], table["shape"]) == (dtype_name, want, shape):
            for bound, name in table["buckets"]:
                if bound is None or num_tokens <= bound:
                    return name
            return table["buckets"][-1][1]
    return None


def _auto_candidates(x, weights, training, top_k):
    if x.device.type != "cuda":
        return ["torch"]
    props = torch.cuda.get_device_properties(x.device)
    measured = None
    if weights[0] is not None and top_k is not None:
        E, I2, H = weights[0].shape
        Ia = weights[2].shape[1] // 2 if weights[2] is not None else 0
        shape = shape_of(H, I2 // 2, Ia, E, top_k)
        measured = lookup(props.name, x.dtype, shape, training, x.shape[0])
    fallback = ["cuda", "triton", "torch"]
    return ([measured] if measured else []) + [n for n in fallback if n != measured]


def _auto(x, weights, training, top_k=None, layout=None):
    if weights is None:  # the routing stage alone
        return "triton" if x.device.type == "cuda" and _available("triton") else "torch"
    for name in _auto_candidates(x, weights, training, top_k):
        if layout is not None and layout not in BACKENDS[name].layouts:
            continue  # the adjugate layout asked for
        if _available(name) and BACKENDS[name].supports(x, weights) is None:
            return name
    return "torch"


def requested_layout():
    """The adjugate layout GROVE_ADJUGATE_LAYOUT asks for, read on every call; None when unset.
    Read here, beside the backend choice it steers, so a call enters settings.py once."""
    layout = os.environ.get(LAYOUT_VARIABLE)
    if layout is not None and layout not in ADJUGATE_LAYOUTS:
        raise ValueError(f"{LAYOUT_VARIABLE}: expected one of {ADJUGATE_LAYOUTS}, got "
                         f"{layout!r}")
    return layout


def layout(name, requested):
    """The layout a call on backend `name` runs: the requested one, else the backend's
    default_layout."""
    return requested or BACKENDS[name].default_layout


def resolve(x, weights=None, training=False, top_k=None, layout=None):
    """The name of the backend that runs a call on x [T, H] (router logits for the routing
    stage alone: weights None) with weights (w1, w2, a1, a2) and top_k experts per token: the
    configured one, or the choice of `auto` for the call's pass (training: it saves for a
    backward, which runs on the same backend). layout: the adjugate layout the caller asked
    for (GROVE_ADJUGATE_LAYOUT), None for the backend's default; auto skips backends that do
    not run it."""
    name = settings.backend
    if name == "auto":
        return _auto(x, weights, training, top_k, layout)
    _check_name(name)
    return name


def get(name, x, weights=None):
    """The Backend object that runs a call (see resolve for x and weights), its stages loaded.
    Raises ValueError when it cannot run the call: a backend named explicitly that does not
    support it is refused here, and only here."""
    if name == "auto":  # an op called directly
        name = _auto(x, weights, False)
    _check_name(name)
    backend = BACKENDS[name]
    if weights is None:
        if x.device.type != "cuda" and not backend.runs_on_cpu:
            raise ValueError(f"backend: {name!r} does not run on {x.device}; use 'torch' or "
                             f"'auto'")
    else:
        reason = backend.supports(x, weights)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
    return backend.load()
