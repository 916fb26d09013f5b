"""pytest-benchmark suite: every variant × pass at the `small` preset (see conftest.py).

Each case times one zero-argument call (forward -> y [T, H]; forward + backward -> the
gradients of ⟨y, g⟩ for x, the weights and topk_weights) and then checks the untimed
result against the torch backend's result for the same layer (grove or plain): a time is
only reported for a variant that computes the right thing. Timings are never asserted.
"""
import pytest
import torch

import grove_kernels as gk
from bench import cost, variants

_BACKENDS = variants.cpu_safe_backends("cuda" if torch.cuda.is_available() else "cpu",
                                       gk.available_backends())
CASES = [
    pytest.param(v.name, b, id=f"{v.name}-{b}")
    for v in variants.VARIANTS
    for b in (_BACKENDS if v.per_backend else (v.backend,))
]


def _synced(fn, device):
    if device.type != "cuda":
        return fn

    def run():  # pytest-benchmark reads a host clock: wait for the GPU inside the timed call
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _build(p, variant, backend, pass_):
    return variants.build(variant, backend, p.preset, p.weights, p.x, p.topk_weights,
                          p.topk_ids, pass_, p.grad_out)


@pytest.mark.parametrize("pass_", cost.PASSES)
@pytest.mark.parametrize("variant_name, backend", CASES)
def test_layer(benchmark, bench_problem, variant_name, backend, pass_):
    p = bench_problem
    variant = variants.VARIANTS_BY_NAME[variant_name]
    reason = variants.skip_reason(variant, p.device, p.dtype, pass_)
    if reason:
        pytest.skip(reason)
    c = cost.layer_cost(p.topk_ids, p.preset, adjugates=variant.layer == "grove", pass_=pass_,
                        elem_bytes=p.x.element_size())
    benchmark.group = f"{p.preset.name} T={p.x.shape[0]} {pass_}"
    benchmark.extra_info.update(flops=c.flops, bytes=c.bytes, distinct_groups=c.distinct_groups,
                                layer=variant.layer, backend=backend)
    out = benchmark(_synced(_build(p, variant, backend, pass_), p.device))

    ref_variant = variants.VARIANTS_BY_NAME["grove" if variant.layer == "grove" else "plain"]
    ref = _build(p, ref_variant, "torch", pass_)()
    tol = variants.tolerance(p.dtype)
    if pass_ == "fwd":
        out, ref = (out,), (ref,)
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape, f"output {i}: shape {tuple(o.shape)} vs {tuple(r.shape)}"
        err = variants.rel_err(o, r)
        assert err <= tol, f"output {i}: rel err {err:.3g} > {tol:g} vs the torch backend"
