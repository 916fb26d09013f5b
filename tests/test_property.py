"""Differential property test: every public experts function, on every CPU backend, against the
float64 oracle (tests/oracle.py), forward and every gradient, on inputs hypothesis draws.

One example draws: the function (fused_grove_experts, grove_moe, fused_experts, fused_moe),
E, S, k, T (0, 1, odd), H / I / Ia (1 included, no multiples of 16 required), the dtype, the
routing (random, every token on one expert, whole groups), selection bias, renormalize,
expert_map, the router weight on the input, inplace, the adjugate layout
(GROVE_ADJUGATE_LAYOUT), and a memory layout for every tensor argument and for dy:

    contiguous | transposed (last two dims) | sliced (every other column) |
    offset (storage offset 3) | expanded (stride 0 along dimension 0)

Each leaf is the base the view is taken from; gradients are compared on the views (what the op
returned) and, outside half types, on the bases (what autograd made of it). Outputs
are poisoned (torch fills uninitialised memory with NaN under deterministic mode), so a
kernel that leaves elements unwritten fails. A call either matches the oracle or refuses with
a ValueError / TypeError naming an argument; the only refusal expected is a backend that
documents it (the triton backend and non-contiguous weights or float64).

Profiles (tests/conftest.py): `ci` (default; derandomized, small) and `dev`
(HYPOTHESIS_PROFILE=dev: many more examples, random).
"""
import contextlib
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, strategies as st  # noqa: E402

import grove_kernels as gk  # noqa: E402
import oracle  # noqa: E402
from helpers import BACKENDS, rel_err, tolerance  # noqa: E402

LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded")
FUNCTIONS = ("fused_grove_experts", "grove_moe", "fused_experts", "fused_moe")
CPU_BACKENDS = [b for b in BACKENDS if b in ("torch", "triton")]


def _base(value, layout):
    """(base, view): a leaf-able base tensor and the function that views it as `value`."""
    if layout == "transposed" and value.dim() >= 2:
        return value.transpose(-1, -2).contiguous(), lambda b: b.transpose(-1, -2)
    if layout == "sliced":
        base = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=value.dtype)
        base[..., ::2] = value
        return base, lambda b: b[..., ::2]
    if layout == "offset":
        flat = torch.cat([torch.zeros(3, dtype=value.dtype), value.reshape(-1)])
        shape = value.shape
        return flat, lambda b: b[3:].view(shape)
    if layout == "expanded" and value.dim() >= 1 and value.shape[0] > 0:
        shape = value.shape
        return value[:1].clone(), lambda b: b.expand(shape)
    return value.clone(), lambda b: b


def _expanded_value(value, layout):
    """The value a base of `layout` can represent (expanded: every row equals row 0)."""
    if layout == "expanded" and value.dim() >= 1 and value.shape[0] > 0:
        return value[:1].expand(value.shape).clone()
    return value


class _Arg:
    """One tensor argument: its base (leaf), layout and view; `of(dtype)` views a copy."""

    def __init__(self, value, layout, grad):
        self.layout = layout
        self.value = _expanded_value(value, layout)
        self.base, self.view = _base(self.value, layout)
        self.grad = grad and value.is_floating_point()

    def leaf(self, dtype=None):
        if dtype is None or not self.base.is_floating_point():
            return self.base.clone()
        return self.base.to(dtype, copy=True).requires_grad_(self.grad)

    def __call__(self, leaf):
        return self.view(leaf)


def _ids(T, k, E, gen, kind, S):
    if kind == "one_expert" and T:
        scores = torch.rand(T, E, generator=gen)
        scores[:, 0] = -1.0
        return scores.argsort(1)[:, :k]
    if kind == "groups" and k % S == 0 and S > 1:
        groups = torch.rand(T, E // S, generator=gen).argsort(1)[:, : k // S]
        ids = (groups[:, :, None] * S + torch.arange(S)).reshape(T, k)
        return ids.gather(1, torch.rand(T, k, generator=gen).argsort(1))
    return torch.rand(T, E, generator=gen).argsort(1)[:, :k]


def _logits(T, E, gen):
    """Well separated (helpers.router_logits): fp32/bf16/fp64 choose the same experts."""
    step = 4.0 / E
    grid = torch.rand(T, E, generator=gen).argsort(1).double() - E / 2
    jitter = (torch.rand(T, E, generator=gen, dtype=torch.float64) - 0.5) * 0.2
    return (grid + jitter) * step


@st.composite
def cases(draw, backend):
    c = {"backend": backend}
    c["fn"] = fn = draw(st.sampled_from(FUNCTIONS))
    grove = fn in ("fused_grove_experts", "grove_moe")
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    if backend == "torch":
        dtypes.append(torch.float64)
    c["dtype"] = draw(st.sampled_from(dtypes))
    if grove:
        c["S"] = S = draw(st.sampled_from([1, 2, 4]))
        G = draw(st.integers(1, 3 if S < 4 else 2))
        E = S * G
    else:
        c["S"] = S = 1
        E = draw(st.integers(1, 6))
    c["E"] = E
    c["k"] = draw(st.integers(1, min(E, 4)))
    c["T"] = draw(st.sampled_from([1, 2, 3, 5, 7, 0]))
    c["H"] = draw(st.sampled_from([1, 2, 3, 5, 8, 17]))
    c["I"] = draw(st.sampled_from([1, 2, 3, 5, 8]))
    c["Ia"] = draw(st.sampled_from([1, 2, 3, 6])) if grove else 0
    c["routing"] = draw(st.sampled_from(["random", "one_expert", "groups"]))
    c["renormalize"] = draw(st.booleans())
    c["bias"] = fn == "grove_moe" and draw(st.booleans())
    c["expert_map"] = fn != "grove_moe" and draw(st.booleans())
    c["extra_groups"] = draw(st.integers(0, 2)) if c["expert_map"] else 0
    c["weight_on_input"] = fn == "fused_experts" and draw(st.booleans())
    c["inplace"] = fn in ("fused_experts", "fused_moe") and draw(st.booleans())
    c["adjugate_layout"] = draw(st.sampled_from(["sections", "folded"]))
    names = ["x", "w1", "w2", "dy"] + (["a1", "a2"] if grove else [])
    names += ["logits", "bias"] if fn in ("grove_moe", "fused_moe") else ["topk_weights",
                                                                       "topk_ids"]
    names += ["expert_map"] if c["expert_map"] else []
    c["layouts"] = {n: draw(st.sampled_from(LAYOUTS)) for n in names}
    # Mostly contiguous weights: a backend that refuses strided ones would leave few examples
    # that reach its kernels.
    weights = ["contiguous"] * (7 if backend == "triton" else 3) + ["as drawn"]
    if draw(st.sampled_from(weights)) == "contiguous":
        c["layouts"].update({n: "contiguous" for n in ("w1", "w2", "a1", "a2") if n in names})
    c["seed"] = draw(st.integers(0, 2 ** 31 - 1))
    return c


def _inputs(c):
    """The _Arg of every tensor argument, plus the expert_map values (global -> local)."""
    gen = torch.Generator().manual_seed(c["seed"])
    T, H, E, S, k, I, Ia = (c[n] for n in ("T", "H", "E", "S", "k", "I", "Ia"))
    G = E // S
    lay = c["layouts"]
    grad = not c["inplace"]
    r = lambda *s, scale=1.0: torch.randn(*s, generator=gen, dtype=torch.float64) * scale  # noqa
    args = {"x": _Arg(r(T, H), lay["x"], grad),
            "w1": _Arg(r(E, 2 * I, H, scale=H ** -0.5), lay["w1"], grad),
            "w2": _Arg(r(E, H, I, scale=I ** -0.5), lay["w2"], grad),
            "dy": _Arg(r(T, H), lay["dy"], False)}
    if Ia:
        args["a1"] = _Arg(r(G, 2 * Ia, H, scale=H ** -0.5), lay["a1"], grad)
        args["a2"] = _Arg(r(G, H, Ia, scale=Ia ** -0.5), lay["a2"], grad)
    # expert_map: E_g global experts (whole groups for Grove), E of them local, shuffled.
    n_global = E + c["extra_groups"] * S
    if c["expert_map"]:
        perm = torch.randperm(n_global // S, generator=gen)[: E // S]  # global groups kept
        emap = torch.full((n_global,), -1, dtype=torch.int64)
        for local_group, g in enumerate(perm.tolist()):
            inner = torch.randperm(S, generator=gen)
            emap[g * S + inner] = local_group * S + torch.arange(S)
        args["expert_map"] = _Arg(emap.to(torch.int32), lay["expert_map"], False)
        if lay["expert_map"] == "expanded":  # a map of one repeated entry is a different map
            args["expert_map"] = _Arg(emap.to(torch.int32), "contiguous", False)
    if c["fn"] in ("grove_moe", "fused_moe"):
        args["logits"] = _Arg(_logits(T, n_global, gen), lay["logits"], grad)
        if c["bias"]:
            bias = (torch.randperm(n_global, generator=gen).double() / n_global) * 0.3
            args["bias"] = _Arg(bias, lay["bias"], False)
    else:
        ids = _ids(T, k, n_global, gen, c["routing"], S)
        args["topk_ids"] = _Arg(ids.to(torch.int32), lay["topk_ids"], False)
        w = torch.rand(T, k, generator=gen, dtype=torch.float64) * 0.9 + 0.1
        args["topk_weights"] = _Arg(w, lay["topk_weights"], grad)
    return args


def _call(c, a):
    """The function under test on views `a` (name -> tensor)."""
    fn = c["fn"]
    if fn == "fused_grove_experts":
        return gk.fused_grove_experts(a["x"], a["w1"], a["w2"], a["a1"], a["a2"],
                                      a["topk_weights"], a["topk_ids"], group_size=c["S"],
                                      adjugate_scale=0.3, expert_map=a.get("expert_map"))
    if fn == "grove_moe":
        return gk.grove_moe(a["x"], a["logits"], a["w1"], a["w2"], a["a1"], a["a2"],
                            top_k=c["k"], group_size=c["S"], adjugate_scale=0.3,
                            renormalize=c["renormalize"], selection_bias=a.get("bias"))
    if fn == "fused_experts":
        return gk.fused_experts(a["x"], a["w1"], a["w2"], a["topk_weights"], a["topk_ids"],
                                inplace=c["inplace"],
                                apply_router_weight_on_input=c["weight_on_input"],
                                expert_map=a.get("expert_map"))
    return gk.fused_moe(a["x"], a["w1"], a["w2"], a["logits"], c["k"], c["renormalize"],
                        inplace=c["inplace"], expert_map=a.get("expert_map"))


def _reference(c, a):
    fn, S = c["fn"], c["S"]
    emap = a.get("expert_map")
    if fn in ("fused_experts", "fused_moe"):
        if fn == "fused_moe":
            w, ids, _ = oracle.fused_topk(a["logits"], c["k"], c["renormalize"])
        else:
            w, ids = a["topk_weights"], a["topk_ids"]
        return oracle.fused_experts(a["x"], a["w1"], a["w2"], w, ids,
                                    apply_router_weight_on_input=c["weight_on_input"],
                                    expert_map=emap)
    if fn == "grove_moe":
        w, ids = oracle.grove_topk(a["logits"], c["k"], c["renormalize"], a.get("bias"))
    else:
        w, ids = a["topk_weights"], a["topk_ids"]
    w1, w2, a1, a2 = a["w1"], a["w2"], a["a1"], a["a2"]
    if emap is not None:  # global weights: zeros off this rank (they contribute nothing)
        n_global = emap.shape[0]
        local = emap.long()
        on = (local >= 0).nonzero().squeeze(1)
        full = lambda t, n, src, dst: t.new_zeros(n, *t.shape[1:]).index_copy(  # noqa: E731
            0, dst, t[src])
        w1 = full(w1, n_global, local[on], on)
        w2 = full(w2, n_global, local[on], on)
        g_on = on[on % S == 0] // S
        lg = local[g_on * S] // S
        a1 = full(a1, n_global // S, lg, g_on)
        a2 = full(a2, n_global // S, lg, g_on)
    return oracle.grove_layer(a["x"], w1, w2, a1, a2, w, ids.long(), S, 0.3)


def _refusal_expected(c, views):
    if c["inplace"] and 0 in views["x"].stride() and c["T"] > 1:
        return "inplace: hidden_states is an expanded view"
    if c["backend"] != "triton":
        return None
    if any(not views[n].is_contiguous() for n in ("w1", "w2", "a1", "a2") if n in views):
        return "contiguous weights"
    return None


@contextlib.contextmanager
def _environment(c):
    """The example's adjugate layout and poisoned allocations; restored afterwards."""
    before = os.environ.get("GROVE_ADJUGATE_LAYOUT")
    det, fill = torch.are_deterministic_algorithms_enabled(), \
        torch.utils.deterministic.fill_uninitialized_memory
    os.environ["GROVE_ADJUGATE_LAYOUT"] = c["adjugate_layout"]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with gk.use_backend(c["backend"]):
            yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        if before is None:
            os.environ.pop("GROVE_ADJUGATE_LAYOUT", None)
        else:
            os.environ["GROVE_ADJUGATE_LAYOUT"] = before


def _leaves(c, args):
    dtype = c["dtype"]
    routing = torch.float64 if dtype == torch.float64 else torch.float32
    return {n: arg.leaf(routing if n in ("topk_weights", "bias") else dtype)
            for n, arg in args.items()}


def _run(c, args, backend):
    """(y, the outputs to compare {name: tensor}) of the call on `backend`; raises what the
    call raises."""
    leaves = _leaves(c, args)
    views = _views(args, leaves)
    x_view = views["x"]
    refusal = _refusal_expected(dict(c, backend=backend), views)
    with _environment(dict(c, backend=backend)):
        try:
            y = _call(c, views)
        except (ValueError, TypeError) as exc:
            assert refusal is not None and refusal in str(exc), f"unexpected refusal: {exc}"
            return refusal
        assert refusal is None, f"expected a refusal ({refusal}), the call ran"
        out = {"y": y}
        if c["inplace"]:
            assert y is x_view, "inplace=True must return hidden_states"
            out["hidden_states after inplace"] = x_view
        if y.requires_grad:  # T = 0 too: its backward must give zeros
            y.backward(views["dy"].to(y.dtype))
        for n, leaf in leaves.items():
            if leaf.requires_grad:
                out["d " + n] = views[n].grad
                if _base_grads_compared(c):
                    out["d " + n + " (base)"] = leaf.grad
    return out


def _views(args, leaves):
    views = {n: args[n](leaf) for n, leaf in leaves.items()}
    for v in views.values():
        if v.requires_grad:
            v.retain_grad()  # the gradient the op returned, before autograd reduces it
    return views


def _base_grads_compared(c):
    """The bases' gradients sum the views' over expanded rows; in a half type that sum can
    cancel to far below its terms' rounding, so there only the views' are compared."""
    return c["dtype"] not in (torch.float16, torch.bfloat16)


def _expected(c, args, perturb=0.0):
    """The oracle's outputs, on fp64 copies of the same (rounded) bases and the same views;
    with `perturb`, every float input is first scaled by 1 + perturb·U(-1, 1)."""
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    leaves = {n: leaf.detach().double() if leaf.is_floating_point() else leaf
              for n, leaf in _leaves(c, args).items()}
    if perturb:
        leaves = {n: t * (1 + perturb * (2 * torch.rand(t.shape, generator=gen,
                                                         dtype=t.dtype) - 1))
                  if t.is_floating_point() else t for n, t in leaves.items()}
    for leaf in leaves.values():
        if leaf.is_floating_point():
            leaf.requires_grad_(True)
    views = _views(args, leaves)
    ref = _reference(c, views)
    out = {"y": ref}
    if c["inplace"]:
        out["hidden_states after inplace"] = ref
    needs = [n for n, a in args.items() if a.grad]
    if ref.numel() and needs and ref.requires_grad:
        ref.backward(views["dy"])
    for n in needs:
        g = views[n].grad
        out["d " + n] = g if g is not None else torch.zeros_like(views[n])
        if _base_grads_compared(c):
            g = leaves[n].grad
            out["d " + n + " (base)"] = g if g is not None else torch.zeros_like(leaves[n])
    return out


def check_case(c):
    note(repr({k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in c.items()}))
    args = _inputs(c)
    dtype = c["dtype"]
    got = _run(c, args, c["backend"])
    if isinstance(got, str):
        hypothesis.event("refused at the call", got)
        return
    want = _expected(c, args)
    assert got["y"].dtype == dtype and tuple(got["y"].shape) == (c["T"], c["H"])
    assert set(got) == set(want), (set(got), set(want))
    half = dtype in (torch.float16, torch.bfloat16)
    torch_out = _run(c, args, "torch") if half and c["backend"] != "torch" else None
    assert not isinstance(torch_out, str), torch_out
    # How far one rounding of every input moves the exact result: where a sum cancels (sizes
    # of 1, few rows) a half type's rounding error can exceed 2e-2 of it.
    sensitivity = _expected(c, args, torch.finfo(dtype).eps) if half else None
    for name, ref in want.items():
        out = got[name]
        assert out is not None, f"{name}: no gradient"
        err = rel_err(out, ref)
        if dtype == torch.float64:
            bound = 1e-10
        elif not half:
            bound = tolerance(dtype)
        else:
            # The rounding of h, z (and w·x) to the dtype is the specified semantics; it
            # costs a few times what rounding the inputs does.
            bound = max(tolerance(dtype), 8 * rel_err(sensitivity[name], ref))
            if torch_out is not None:  # or within 2x the torch backend's error
                bound = max(bound, 2 * rel_err(torch_out[name], ref) + 1e-5)
        assert err <= bound, f"{name}: rel err {err:.3e} > {bound:.1e}"
    grads = any(name.startswith("d ") for name in want)
    hypothesis.event("forward and gradients" if grads else "forward only")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(data=st.data())
def test_matches_float64_oracle(backend, data):
    check_case(data.draw(cases(backend)))
