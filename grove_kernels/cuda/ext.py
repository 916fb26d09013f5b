"""The CUTLASS/CUDA extension grove_kernels._C (built from csrc/) and thin wrappers of its ops.

Loading the extension registers the low-level ops of torch.ops.grove_cuda: the grouped GEMMs
of gemm_kernels.GEMM_KERNELS (generated from csrc/generate_kernels.py; GEMM-1 with SwiGLU fused
among them) and the element-wise kernels (gather, SwiGLU, combine); the wrappers here pass
torch's current CUDA stream. The extension is linked without libtorch_cuda (docs/design.md §4), so
it imports under a CPU torch too; its ops take the CUDA stream as an int (`current_stream_handle()`).
"""
import torch

from .gemm_kernels import GEMM_KERNELS

try:
    from .. import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # not built here, or built against another torch/toolkit
    _C = None
    _import_error = exc
else:
    _import_error = None

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = tuple(dict.fromkeys(_TORCH_DTYPES[k.dtype] for k in GEMM_KERNELS))
_KNOWN_OPS = ("grouped_gemm", "grouped_gemm_kernels", "grouped_gemm_workspace_size",
              "grouped_gemm_args", "gather_rows", "swiglu_fwd", "swiglu_bwd", "combine_rows",
              "rows_dot_scale", "swiglu_folded_fwd", "scale_folded", "swiglu_folded_bwd")


def is_built():
    """True when grove_kernels._C was built and imported."""
    return _C is not None


def registered_ops():
    """Sorted names of the ops in torch.ops.grove_cuda (empty when the extension is absent)."""
    if _C is None:
        return []
    try:  # every registered operator name, e.g. "grove_cuda::grouped_gemm"
        registered = torch._C._dispatch_get_registrations_for_dispatch_key("")
    except (AttributeError, RuntimeError):  # private API: fall back to the known names
        registered = [f"grove_cuda::{n}" for n in _KNOWN_OPS if hasattr(torch.ops.grove_cuda, n)]
    names = {r.split("::", 1)[1].split(".", 1)[0] for r in registered
             if r.startswith("grove_cuda::")}
    return sorted(names)


def op_schemas():
    """{op name: schema string} of the ops in torch.ops.grove_cuda."""
    return {name: str(getattr(torch.ops.grove_cuda, name).default._schema)
            for name in registered_ops()}


def build_info():
    """What the extension provides here: built?, import error, ops and GEMM kernel names."""
    info = {
        "built": is_built(),
        "import_error": None if _import_error is None else str(_import_error),
        "ops": registered_ops(),
        "gemm_kernels": [],
        "backend_available": is_available(),
    }
    if "grouped_gemm_kernels" in info["ops"]:
        info["gemm_kernels"] = list(torch.ops.grove_cuda.grouped_gemm_kernels())
    return info


def _require():
    if _C is None:
        raise RuntimeError(f"grove_kernels._C is not built here ({_import_error})")


def current_stream_handle(device=None):
    """The cudaStream_t of torch's current stream on `device`, as the int the ops expect."""
    return torch.cuda.current_stream(device).cuda_stream


def gemm_kernel(dtype, grouped, majors, *, epilogue=None, schedule):
    """The name of the grouped-GEMM kernel of GEMM_KERNELS with these fields, e.g.
    gemm_kernel(torch.bfloat16, "m", "nt", schedule="coop") ->
    "sm90_bf16_m_grouped_nt_coop_128x256x64_c1x1".

    grouped "m" | "k"; majors "nt" | "nn" | "tn" (csrc/include/grove_cuda.h); epilogue None |
    "swiglu"; schedule "coop" | "pingpong". ValueError names what the table lacks.
    """
    names = {v: k for k, v in _TORCH_DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype: no grouped-GEMM kernel for {dtype}; the table has "
                         f"{list(DTYPES)}")
    want = {"dtype": names[dtype], "grouped": grouped, "majors": majors, "epilogue": epilogue,
            "schedule": schedule}
    found, matched = GEMM_KERNELS, []
    for field, value in want.items():  # narrow field by field: the error names the first miss
        narrowed = [k for k in found if getattr(k, field) == value]
        if not narrowed:
            have = sorted({repr(getattr(k, field)) for k in found})
            among = f" among those with {', '.join(matched)}" if matched else ""
            raise ValueError(f"{field}: no grouped-GEMM kernel has {field}={value!r}{among} "
                             f"(they have {', '.join(have)}; csrc/generate_kernels.py)")
        found, matched = narrowed, matched + [f"{field}={value!r}"]
    if len(found) > 1:  # several tiles of these fields: the caller must choose one by name
        raise ValueError(f"several grouped-GEMM kernels have {', '.join(matched)}: "
                         f"{[k.name for k in found]}")
    return found[0].name


# Rows per expert up to which the ping-pong 64x128 tile wins (docs/design.md §4, GEMM-1, H100).
_PINGPONG_MAX_ROWS_PER_EXPERT = 64


def m_grouped_schedule(plan):
    """The schedule of a plan's m-grouped GEMMs: "pingpong" for few rows per expert, else
    "coop" (the weight gradients always run "coop")."""
    rows_per_expert = plan.num_tokens * plan.top_k / max(plan.num_experts, 1)
    return "pingpong" if rows_per_expert <= _PINGPONG_MAX_ROWS_PER_EXPERT else "coop"


def grouped_gemm(a, b, out, start, count, kernel, b_shared=None, row_scale=None):
    """For every plan problem p: D_p = A_p @ B_p (layouts in csrc/include/grove_cuda.h).

    kernel: a name of GEMM_KERNELS (gemm_kernel()); a, b, out: lists of 1 or 2 sections, by
    the kernel's grouped axis and majors:
        m_grouped_nt         a [R_s, K], b [P_s, N, K], out [R_s, N]
        m_grouped_nt_swiglu  the same, b's rows [0, N/2) gate and [N/2, N) up (w1 / a1 as
                             they are), N a multiple of 16; out [R_s, N / 2] = silu(gate) * up
        m_grouped_nn         a [R_s, K], b [P_s, K, N], out [R_s, N]
        k_grouped_tn         a [R_s, M], b [R_s, N], out [P_s, M, N]   (weight gradients)
    start, count [sum P_s] int32/int64 absolute rows: section s's rows are numbered from
    R_0 + ... + R_{s-1} on (two sections may view one row buffer).
    b_shared: None, or per section the problems that read one B (m-grouped; section s then has
    b[s].shape[0] * b_shared[s] problems; the folded adjugates: S experts per a1 / a2).
    row_scale: None, or (m_grouped_nt_swiglu only) per section an fp32 vector over the rows of
    a[s] / out[s]: out row r = row_scale[s][r] * silu(gate) * up, rounded once (the folded
    layout's router and leader weights).
    Runs on torch's current stream; no host synchronisation.
    """
    _require()
    torch.ops.grove_cuda.grouped_gemm(list(a), list(b), list(out), start, count, kernel,
                                      current_stream_handle(a[0].device), list(b_shared or []),
                                      list(row_scale or []))
    return out


def grouped_gemm_args(a, b, out, start, count, kernel, b_shared=None):
    """The device arguments grouped_gemm would fill for these operands, computed on the host by
    the same fill function (start / count on the CPU; operands anywhere: only their addresses
    are used), decoded: {"shapes": [P, 3] (M, N, K), "a" / "b" / "d": [P] addresses,
    "ld": [P, 3] (A, B, D)} as int64 tensors."""
    _require()
    P = int(start.numel())
    buf = torch.ops.grove_cuda.grouped_gemm_args(list(a), list(b), list(out), start, count,
                                                 kernel, list(b_shared or []))
    if P == 0:
        return {"shapes": torch.zeros(0, 3, dtype=torch.int64),
                **{n: torch.zeros(0, dtype=torch.int64) for n in "abd"},
                "ld": torch.zeros(0, 3, dtype=torch.int64)}

    def align(n):
        return (n + 127) // 128 * 128
    blocks, at = [], 0
    for size in [P * 12] + [P * 8] * 6:  # shapes int32[P][3], 3 pointer and 3 int64 blocks
        blocks.append(buf[at:at + size])
        at += align(size)
    shapes = blocks[0].view(torch.int32).view(P, 3).long()
    a_, b_, d_, lda, ldb, ldd = (blk.view(torch.int64) for blk in blocks[1:])
    return {"shapes": shapes, "a": a_, "b": b_, "d": d_, "ld": torch.stack([lda, ldb, ldd], 1)}


def _stream(t):
    return current_stream_handle(t.device)


def gather_rows(x, row_token, row_weight, rows_e, end_e, end_a, out):
    _require()
    torch.ops.grove_cuda.gather_rows(x, row_token, row_weight, rows_e, end_e, end_a, out,
                                     _stream(x))
    return out


def swiglu_fwd(h, end, out):
    _require()
    torch.ops.grove_cuda.swiglu_fwd(h, out.shape[0], end, None, out, _stream(h))
    return out


def swiglu_bwd(g, h, row_weight, end, dh, d_row_weight):
    _require()
    torch.ops.grove_cuda.swiglu_bwd(g, h, row_weight, g.shape[0], end, None, dh, d_row_weight,
                                    _stream(g))
    return dh


def combine_rows(rows, token_rows, token_mask, token_weight, out):
    _require()
    torch.ops.grove_cuda.combine_rows(rows, token_rows, token_mask, token_weight, out,
                                      _stream(rows))
    return out


def rows_dot_scale(rows, x, row_token, row_weight, rows_e, end_e, end_a, dot):
    _require()
    torch.ops.grove_cuda.rows_dot_scale(rows, x, row_token, row_weight, rows_e, end_e, end_a,
                                        dot, _stream(rows))
    return rows


def swiglu_folded_fwd(h, I, offsets, leader_ends, row_weight, leader_weight, z, zs,
                      zero_h=False):
    """Folded layout: z = [silu(g_e)·u_e | leader ? silu(g_a)·u_a : 0] (unscaled; when z is
    given) and zs = [w·z_e | λΣw·z_a] (when zs is given) from h [R, 2I + 2Ia]."""
    _require()
    torch.ops.grove_cuda.swiglu_folded_fwd(h, I, offsets, leader_ends, row_weight,
                                           leader_weight, zero_h, z, zs, _stream(h))
    return z, zs


def scale_folded(z, I, offsets, leader_ends, row_weight, leader_weight, zs):
    """Folded layout: zs = [w·z_e | leader ? λΣw·z_a : 0] (zs may be z: in place)."""
    _require()
    torch.ops.grove_cuda.scale_folded(z, I, offsets, leader_ends, row_weight, leader_weight, zs,
                                      _stream(z))
    return zs


def swiglu_folded_bwd(g, h, I, offsets, leader_ends, row_weight, leader_weight, dh,
                      d_row_weight, d_leader_weight):
    """Folded layout: dh [R, 2I + 2Ia] from g [R, I + Ia] and h; d row weight and d leader
    weight [R] (fp32; 0 on padding and, for the latter, on rows that lead no group)."""
    _require()
    torch.ops.grove_cuda.swiglu_folded_bwd(g, h, I, offsets, leader_ends, row_weight,
                                           leader_weight, dh, d_row_weight, d_leader_weight,
                                           _stream(g))
    return dh


def is_available():
    """True when the backend can run here: extension built, a CUDA GPU of compute capability
    9.x (the objects are sm_90a only)."""
    if _C is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] == 9

