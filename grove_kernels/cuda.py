"""The `cuda` backend: the CUTLASS/CUDA kernels of csrc/, built as grove_kernels._C.

Loading the extension registers low-level ops under torch.ops.grove_cuda (today: the sm_90a
ptr-array grouped GEMM, `grouped_gemm_bf16`). Those are building blocks, NOT a backend: until
experts_forward / experts_backward / topk exist here and have passed the GPU tests,
`is_available()` stays False, so `auto` never picks `cuda` and `use_backend("cuda")` refuses.
`build_info()` reports what the extension provides.

The extension is linked without libtorch_cuda (DESIGN §4), so it imports under a CPU torch
too; its ops take the CUDA stream as an int (`current_stream_handle()`).
"""
import torch

try:
    from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # not built here, or built against another torch/toolkit
    _C = None
    _import_error = exc
else:
    _import_error = None

runs_on_cpu = False

# The ops this module's backend functions will need; is_available() requires all of them AND
# the backend entry points below, which do not exist yet (issue 4).
_BACKEND_ENTRY_POINTS = ("experts_forward", "experts_backward", "topk")
_KNOWN_OPS = ("grouped_gemm_bf16", "grouped_gemm_configs", "grouped_gemm_workspace_size")


def is_built():
    """True when grove_kernels._C was built and imported."""
    return _C is not None


def registered_ops():
    """Sorted names of the ops in torch.ops.grove_cuda (empty when the extension is absent)."""
    if _C is None:
        return []
    try:  # every registered operator name, e.g. "grove_cuda::grouped_gemm_bf16"
        registered = torch._C._dispatch_get_registrations_for_dispatch_key("")
    except (AttributeError, RuntimeError):  # private API: fall back to the known names
        registered = [f"grove_cuda::{n}" for n in _KNOWN_OPS if hasattr(torch.ops.grove_cuda, n)]
    names = {r.split("::", 1)[1].split(".", 1)[0] for r in registered
             if r.startswith("grove_cuda::")}
    return sorted(names)


def op_schemas():
    """{op name: schema string} of the ops in torch.ops.grove_cuda."""
    out = {}
    for name in registered_ops():
        packet = getattr(torch.ops.grove_cuda, name)
        out[name] = str(packet.default._schema)
    return out


def build_info():
    """What the extension provides here: built?, import error, ops and GEMM configurations."""
    info = {
        "built": is_built(),
        "import_error": None if _import_error is None else str(_import_error),
        "ops": registered_ops(),
        "gemm_configs": [],
        "backend_available": is_available(),
    }
    if "grouped_gemm_configs" in info["ops"]:
        info["gemm_configs"] = list(torch.ops.grove_cuda.grouped_gemm_configs())
    return info


def current_stream_handle(device=None):
    """The cudaStream_t of torch's current stream on `device`, as the int the ops expect."""
    return torch.cuda.current_stream(device).cuda_stream


def grouped_gemm_bf16(a, b, out, start, count, config="coop_128x256_c11"):
    """out[s] rows of problem p = a[s] rows of p @ b[s][j]^T (see csrc/include/grove_cuda.h).

    a, b, out: lists (1 or 2 segments: experts, adjugates) of [R_s, K_s], [P_s, N_s, K_s] and
    [R_s, N_s] bf16 tensors; start, count: [sum P_s] int32/int64 absolute plan rows, e.g.
    Plan.problem_rows(). Runs on torch's current stream; no host synchronisation.
    """
    if _C is None:
        raise RuntimeError(f"grove_kernels._C is not built here ({_import_error})")
    torch.ops.grove_cuda.grouped_gemm_bf16(
        list(a), list(b), list(out), start, count, config, current_stream_handle(a[0].device))
    return out


def is_available():
    """False until the full backend (experts_forward/backward, topk) exists and is GPU-tested."""
    if _C is None or not torch.cuda.is_available():
        return False
    return all(callable(globals().get(name)) for name in _BACKEND_ENTRY_POINTS)
