"""What a row times: the variants of docs/design.md §6 and how each becomes a zero-argument
callable.

Shapes: x [T, H], w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia],
topk_weights [T, k] fp32, topk_ids [T, k] int32, y [T, H], grad_out g [T, H].

    grove            gk.fused_grove_experts under each gk backend (the layer of this package)
    plain            gk.fused_experts, same backend: the layer without adjugates
    grove-2call      the released scheme: fused_experts(x, w1, w2, w, ids)
                     + fused_experts(x, a1, a2, λ·w, ids // S); a shared adjugate runs twice
    grouped_mm       Grove layer from torch._grouped_mm + autograd, the usual form (one sort,
                     gather, grouped_mm, SwiGLU, grouped_mm, un-permute, bmm with the weights;
                     bench.grouped_mm_layer)
    grouped_mm-plain its plain MoE twin: the fair torch._grouped_mm training baseline
    grouped_mm-index_add, grouped_mm-index_add-plain
                     the bench's first torch._grouped_mm layer (fp32 index_add combine, masks,
                     a sort per section; bench.grouped_mm_index_add), kept to show its cost
    liger            Liger-Kernel's fused MoE (plain; bench.anchors)
    liger-2call      the Grove layer from two Liger calls (adjugates with ids // S)
    scattermoe       ScatterMoE's parallel_linear chain (plain; bench.anchors)
    vllm             vLLM's fused_experts on the plain layer (forward only: it has no backward)

TRAINING_ANCHORS are the plain training layers a Grove trainer would otherwise use: the report
names the fastest of them per (routing, T, pass) in the same run.

Forward (`fwd`): the callable returns y. Forward + backward (`fwd+bwd`): the callable runs the
forward on leaves that require grad (x, every weight the layer uses, topk_weights) and returns
torch.autograd.grad(y, leaves, g). autograd.grad, not .backward(): nothing accumulates into
.grad between replays, so a captured graph is idempotent. g is a fixed random tensor rather
than ones: the gradient of y.sum() is an expanded (stride-0) tensor, which some kernels
(torch._grouped_mm among them) reject, and a loss ⟨y, g⟩ costs the same.
The λ·w and ids // S of the two-call schemes are computed inside the timed call: the released
layer pays for them too.

Add a variant by appending to VARIANTS; the runner, the report and the pytest suite pick it up.
"""
import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import grove_kernels as gk
from bench import anchors
from bench.grouped_mm_index_add import grouped_mm_index_add_moe
from bench.grouped_mm_layer import grouped_mm_moe


@dataclass
class Tensors:
    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    w: torch.Tensor
    ids: torch.Tensor


@dataclass(frozen=True)
class Variant:
    name: str
    layer: str  # "grove" or "plain": the math it computes, hence its cost and its reference
    forward: Callable  # (Tensors, Preset) -> y
    backend: Optional[str] = None  # None: run under every gk backend; else a fixed label
    baseline: Optional[str] = None  # variant whose time (same backend) the report divides by
    backward: bool = True
    probe: Optional[Callable] = field(default=None, compare=False)  # (device, dtype) -> reason|None
    layouts: bool = False  # GROVE_ADJUGATE_LAYOUT changes what it runs (the runner's --layout)

    @property
    def per_backend(self):
        return self.backend is None


def _grove(t, p):
    return gk.fused_grove_experts(t.x, t.w1, t.w2, t.a1, t.a2, t.w, t.ids,
                                  group_size=p.group_size, adjugate_scale=p.adj_scale)


def _plain(t, p):
    return gk.fused_experts(t.x, t.w1, t.w2, t.w, t.ids)


def _grove_2call(t, p):
    y = gk.fused_experts(t.x, t.w1, t.w2, t.w, t.ids)
    return y + gk.fused_experts(t.x, t.a1, t.a2, p.adj_scale * t.w, t.ids // p.group_size)


def _grouped_mm(t, p):
    return grouped_mm_moe(t.x, t.w1, t.w2, t.w, t.ids, t.a1, t.a2,
                          group_size=p.group_size, adjugate_scale=p.adj_scale)


def _grouped_mm_plain(t, p):
    return grouped_mm_moe(t.x, t.w1, t.w2, t.w, t.ids)


def _grouped_mm_index_add(t, p):
    return grouped_mm_index_add_moe(t.x, t.w1, t.w2, t.w, t.ids, t.a1, t.a2,
                                    group_size=p.group_size, adjugate_scale=p.adj_scale)


def _grouped_mm_index_add_plain(t, p):
    return grouped_mm_index_add_moe(t.x, t.w1, t.w2, t.w, t.ids)


def _liger(t, p):
    return anchors.liger_forward(t.x, t.w1, t.w2, t.w, t.ids)


def _liger_2call(t, p):
    return anchors.liger_grove_2call(t.x, t.w1, t.w2, t.a1, t.a2, t.w, t.ids, p.group_size,
                                     p.adj_scale)


def _scattermoe(t, p):
    return anchors.scattermoe_forward(t.x, t.w1, t.w2, t.w, t.ids)


def _vllm(t, p):
    from vllm.model_executor.layers.fused_moe import fused_experts

    return fused_experts(t.x, t.w1, t.w2, t.w, t.ids)


@functools.lru_cache(maxsize=None)
def _probe_grouped_mm(device, dtype):
    """Why torch._grouped_mm cannot run here (None if it can): a forward and a backward of
    both torch._grouped_mm layers on a 4-token problem. Kernels exist only for some
    device/dtype pairs (CUDA: bf16 on sm_90+; CPU: fp32, bf16, fp16)."""
    if not hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm is missing from this torch"
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 32, generator=gen).to(device, dtype).requires_grad_()
        w1 = torch.randn(4, 32, 32, generator=gen).to(device, dtype).requires_grad_()
        w2 = torch.randn(4, 32, 16, generator=gen).to(device, dtype).requires_grad_()
        ids = torch.tensor([[0, 1], [1, 3], [3, 2], [0, 3]], device=device, dtype=torch.int32)
        w = torch.full((4, 2), 0.5, device=device, requires_grad=True)
        for layer in (grouped_mm_moe, grouped_mm_index_add_moe):
            y = layer(x, w1, w2, w, ids, w1[:2], w2[:2], group_size=2)
            torch.autograd.grad(y, (x, w1, w2, w), torch.ones_like(y))
    except Exception as exc:
        return f"torch._grouped_mm fails on {device}/{dtype}: {type(exc).__name__}: {exc}"[:200]
    return None


@functools.lru_cache(maxsize=None)
def _probe_vllm(device, dtype):
    try:
        import vllm  # noqa: F401
        from vllm.model_executor.layers.fused_moe import fused_experts  # noqa: F401
    except Exception as exc:
        return f"vllm not importable ({type(exc).__name__})"
    if device.type != "cuda":
        return "vllm fused_experts needs a CUDA device"
    return None


VARIANTS = (
    Variant("grove", "grove", _grove, baseline="plain", layouts=True),
    Variant("plain", "plain", _plain, baseline="plain"),
    Variant("grove-2call", "grove", _grove_2call, baseline="plain"),
    Variant("grouped_mm", "grove", _grouped_mm, backend="aten", baseline="grouped_mm-plain",
            probe=_probe_grouped_mm),
    Variant("grouped_mm-plain", "plain", _grouped_mm_plain, backend="aten",
            baseline="grouped_mm-plain", probe=_probe_grouped_mm),
    Variant("grouped_mm-index_add", "grove", _grouped_mm_index_add, backend="aten",
            baseline="grouped_mm-index_add-plain", probe=_probe_grouped_mm),
    Variant("grouped_mm-index_add-plain", "plain", _grouped_mm_index_add_plain, backend="aten",
            baseline="grouped_mm-index_add-plain", probe=_probe_grouped_mm),
    Variant("liger", "plain", _liger, backend="liger", baseline="liger",
            probe=anchors.probe_liger),
    Variant("liger-2call", "grove", _liger_2call, backend="liger", baseline="liger",
            probe=anchors.probe_liger),
    Variant("scattermoe", "plain", _scattermoe, backend="scattermoe", baseline="scattermoe",
            probe=anchors.probe_scattermoe),
    Variant("vllm", "plain", _vllm, backend="vllm", baseline="vllm", backward=False,
            probe=_probe_vllm),
)
VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}
TRAINING_ANCHORS = ("liger", "grouped_mm-plain", "scattermoe")


def skip_reason(variant, device, dtype, pass_):
    """Why `variant` cannot be timed for this device/dtype/pass, or None."""
    if pass_ == "fwd+bwd" and not variant.backward:
        return f"{variant.name} has no backward"
    return variant.probe(device, dtype) if variant.probe is not None else None


def make_weights(preset, device, dtype, seed=0):
    """w1, w2, a1, a2 for `preset`, scaled so every GEMM output has O(1) entries (bf16 keeps
    its precision; no inf/NaN at any T). Drawn on the CPU so all devices see the same values."""
    gen = torch.Generator().manual_seed(seed)
    H, E, I, G, Ia = preset.hidden, preset.experts, preset.intermediate, preset.groups, \
        preset.adj_intermediate

    def rand(*shape, fan_in):
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).to(device, dtype)

    return {
        "w1": rand(E, 2 * I, H, fan_in=H),
        "w2": rand(E, H, I, fan_in=I),
        "a1": rand(G, 2 * Ia, H, fan_in=H),
        "a2": rand(G, H, Ia, fan_in=Ia),
    }


def cpu_safe_backends(device_type, backends):
    """The subset of `backends` worth running for quick checks on `device_type`: on a CPU only
    torch, since Triton there is its interpreter (a time of Python, minutes per large call)."""
    return tuple(backends) if device_type == "cuda" else tuple(b for b in backends if b == "torch")


def backend_context(variant, backend):
    return gk.use_backend(backend) if variant.per_backend else contextlib.nullcontext()


def build(variant, backend, preset, weights, x, topk_weights, topk_ids, pass_, grad_out=None):
    """A zero-argument callable running one `pass_` of `variant` (see the module docstring)."""
    ctx = functools.partial(backend_context, variant, backend)
    if pass_ == "fwd":
        t = Tensors(x, weights["w1"], weights["w2"], weights["a1"], weights["a2"],
                    topk_weights, topk_ids)

        def fwd():
            with ctx():
                return variant.forward(t, preset)

        return fwd

    # detach() shares storage: the leaves cost no memory beyond the gradients themselves.
    leaf = {n: v.detach().requires_grad_() for n, v in weights.items()}
    t = Tensors(x.detach().requires_grad_(), leaf["w1"], leaf["w2"], leaf["a1"], leaf["a2"],
                topk_weights.detach().requires_grad_(), topk_ids)
    used = [t.x, t.w1, t.w2] + ([t.a1, t.a2] if variant.layer == "grove" else []) + [t.w]
    if grad_out is None:
        raise ValueError("grad_out: required for pass 'fwd+bwd'")

    def fwd_bwd():
        with ctx():
            y = variant.forward(t, preset)
            return torch.autograd.grad(y, used, grad_out)

    return fwd_bwd


def reference(layer, preset, weights, x, topk_weights, topk_ids, pass_="fwd", grad_out=None):
    """The torch backend's result for `layer` ("grove" or "plain") in the run's dtype: y for
    "fwd", the gradient tuple (x, weights..., topk_weights) for "fwd+bwd"."""
    variant = VARIANTS_BY_NAME["grove" if layer == "grove" else "plain"]
    fn = build(variant, "torch", preset, weights, x, topk_weights, topk_ids, pass_, grad_out)
    if pass_ == "fwd":
        with torch.no_grad():
            return fn()
    return fn()


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in fp64 (docs/design.md §5); inf when out has a NaN or inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def tolerance(dtype):
    """Flag threshold for the pre-timing check: a wrong kernel's time is not a result.
    Looser than docs/design.md §5's (that compares against fp64; this against the torch backend in
    the same dtype, whose own rounding error adds in)."""
    return 1e-3 if dtype == torch.float32 else 4e-2
