"""Third-party MoE training layers the bench times beside ours (docs/design.md §6): each one called
from its public API on the bench's tensors, and why it cannot run here when it cannot.

    x [T, H], w1 [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up), w2 [E, H, I],
    a1 [G, 2Ia, H], a2 [G, H, Ia], topk_weights [T, k] fp32, topk_ids [T, k] int32
    -> y [T, H] in x's dtype; differentiable in x, the weights and topk_weights

    liger        Liger-Kernel 0.8.5, liger_kernel.ops.fused_moe.LigerFusedMoEFunction
                 .apply(x, w1, w2, ids int32, w): its gate_up_proj [E, 2I, H] (gate rows
                 first) and down_proj [E, H, I] are our layout, so the weights pass as they
                 are. Plain layer. Its routing metadata reads a tile count on the host (one
                 .item()), so it does not capture in a CUDA graph: the bench times it eagerly
                 (`timing: eager`, launch overhead included) and records the capture error.
                 Its Triton autotuner runs on the first call of a shape (the bench's untimed
                 check call); LIGER_FUSED_MOE_AUTOTUNE=0 before the import pins one config.
    liger-2call  the Grove layer as a Liger user builds it, the released two-call scheme:
                 liger(x, w1, w2, w, ids) + liger(x, a1, a2, λ·w, ids // S). A token's
                 shared adjugate runs once per expert of its group (k rows, not d_t), whose
                 sum is the Grove layer's λ·Σw·adjugate. λ·w and ids // S are computed in
                 the timed call.
    scattermoe   ScatterMoE 0.3.0 (github.com/shawntan/scattermoe; not on PyPI: a checkout
                 on PYTHONPATH, or a wheel built from one) from its exported functional API,
                 the chain its GLUMLP.forward runs: flatten_sort_count(ids, E) ->
                 parallel_linear(x, w1ᵀ, k, ..., grouped_out=True) -> [gate | up] -> silu(gate)
                 ⊙ up -> parallel_linear(·, w2ᵀ, 1, ..., grouped_in=True, gates=w). GLUMLP
                 itself keeps [up | gate] rows, so the functional form is what takes our w1
                 without a copy. Its gates multiply y in x's dtype (one bmm), hence w.to(x's
                 dtype) in the timed call. Plain layer; its expert count is a bincount, which
                 syncs on a GPU: eager timing as for liger.

Both are Triton kernels. On a CPU they run only under TRITON_INTERPRET=1 (interpreted Python,
far too slow to time); the bench therefore skips them off a GPU, and bench/test_anchors.py
checks their wiring against the float64 oracle at tiny shapes under the interpreter.
"""
import functools
import importlib.metadata
import sys

import torch
import torch.nn.functional as F

LIGER_SPEC = "liger-kernel==0.8.5"
SCATTERMOE_SOURCE = "github.com/shawntan/scattermoe (0.3.0, commit 47b5e15)"
_CPU_REASON = ("is Triton kernels: timed on a GPU only (on a CPU they run under "
               "TRITON_INTERPRET=1 alone; bench/test_anchors.py checks them that way)")


def liger_forward(x, w1, w2, topk_weights, topk_ids):
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    return LigerFusedMoEFunction.apply(x, w1, w2, topk_ids.to(torch.int32), topk_weights)


def liger_grove_2call(x, w1, w2, a1, a2, topk_weights, topk_ids, group_size, adjugate_scale):
    y = liger_forward(x, w1, w2, topk_weights, topk_ids)
    return y + liger_forward(x, a1, a2, adjugate_scale * topk_weights, topk_ids // group_size)


def scattermoe_forward(x, w1, w2, topk_weights, topk_ids):
    import scattermoe

    k = topk_ids.shape[1]
    sorted_ids, sorted_slots, offsets = scattermoe.flatten_sort_count(
        topk_ids, num_experts=w1.shape[0])
    h = scattermoe.parallel_linear(x, w1.permute(0, 2, 1), k, sorted_ids, sorted_slots,
                                   offsets, grouped_out=True)
    gate, up = h.chunk(2, dim=-1)
    return scattermoe.parallel_linear(F.silu(gate) * up, w2.permute(0, 2, 1), 1, sorted_ids,
                                      sorted_slots, offsets, grouped_in=True,
                                      gates=topk_weights.to(x.dtype))


def _import_reason(what, exc, how):
    return f"{what} not importable ({type(exc).__name__}: {exc}); {how}"[:240]


def liger_import_error():
    """Why LigerFusedMoEFunction cannot be imported here, or None."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction  # noqa: F401
    except Exception as exc:
        return _import_reason("liger-kernel", exc, f"pip install {LIGER_SPEC}")
    return None


def scattermoe_import_error():
    """Why ScatterMoE's functional API (0.3.0) cannot be imported here, or None."""
    try:
        import scattermoe
    except Exception as exc:
        return _import_reason("scattermoe", exc, f"not on PyPI: put a checkout of "
                              f"{SCATTERMOE_SOURCE} on PYTHONPATH")
    missing = [n for n in ("flatten_sort_count", "parallel_linear") if not hasattr(scattermoe, n)]
    if missing:
        return (f"scattermoe at {getattr(scattermoe, '__file__', '?')} lacks {missing}: "
                f"the bench wires the 0.3.0 API of {SCATTERMOE_SOURCE}")
    return None


@functools.lru_cache(maxsize=None)
def probe_liger(device, dtype):
    if device.type != "cuda":
        return f"liger {_CPU_REASON}"
    return liger_import_error()


@functools.lru_cache(maxsize=None)
def probe_scattermoe(device, dtype):
    if device.type != "cuda":
        return f"scattermoe {_CPU_REASON}"
    return scattermoe_import_error()


def versions():
    """{distribution: version} of the anchors this process has imported (the JSON records
    them; a source checkout without metadata reports "source"), and whether Liger's
    autotuner ran (LIGER_FUSED_MOE_AUTOTUNE=0 pins one config: a slower Liger)."""
    out = {}
    for module, dist in (("liger_kernel", "liger-kernel"), ("scattermoe", "scattermoe")):
        if module in sys.modules:
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[dist] = "source"
    kernels = sys.modules.get("liger_kernel.ops.fused_moe_kernels")
    if kernels is not None:
        out["liger_autotune"] = not getattr(kernels, "_AUTOTUNE_DISABLED", False)
    return out
