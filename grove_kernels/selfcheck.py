"""`python -m grove_kernels.selfcheck`: every available backend against the float64 reference.

On the best device present (a GPU when there is one) it runs the Grove layer, forward and
backward, at the grove-33b shapes on a GPU (H 2048, E 128, k 8, I 768, S 2, Ia 128) or at the
`mini` preset on a CPU (grove_kernels/presets.py), and compares outputs and all six gradients with the torch backend run
in float64 on the CPU (docs/design.md §5 tolerances). Exits 1 if any comparison fails.
"""
import argparse
import sys

import torch

import grove_kernels as gk
from grove_kernels.presets import PRESETS
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _inputs(T, H, E, k, I, S, Ia, seed):
    g = torch.Generator().manual_seed(seed)
    G = E // S

    def rnd(*shape, fan_in=None):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return t * fan_in ** -0.5 if fan_in else t

    return dict(x=rnd(T, H), w1=rnd(E, 2 * I, H, fan_in=H), w2=rnd(E, H, I, fan_in=I),
                a1=rnd(G, 2 * Ia, H, fan_in=H), a2=rnd(G, H, Ia, fan_in=Ia),
                logits=rnd(T, E), grad=rnd(T, H))


def _run(inputs, k, S, dtype, device):
    """Forward and gradients of grove_moe (router logits included)."""
    leaves = {n: inputs[n].to(device, dtype, copy=True).requires_grad_()
              for n in ("x", "w1", "w2", "a1", "a2")}
    logits = inputs["logits"].to(device, torch.float32 if dtype != torch.float64 else dtype,
                                 copy=True)
    logits.requires_grad_()
    y = gk.grove_moe(leaves["x"], logits, leaves["w1"], leaves["w2"], leaves["a1"], leaves["a2"],
                     top_k=k, group_size=S)
    y.backward(inputs["grad"].to(device, dtype))
    grads = {n: t.grad for n, t in leaves.items()}
    grads["logits"] = logits.grad
    return y, grads


def _rel(out, ref):
    out = out.detach().double().cpu()
    ref = ref.detach()
    err = (out - ref).norm() / ref.norm().clamp_min(1e-300)
    return float("nan") if torch.isnan(out).any() else float(err)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--tokens", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("grove-33b" if device.type == "cuda" else "mini")
    p = PRESETS[preset]
    T = args.tokens or (64 if device.type == "cuda" else p.cpu_tokens[0])
    H, E, k, I, S, Ia = p.hidden, p.experts, p.top_k, p.intermediate, p.group_size, \
        p.adj_intermediate
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]
    inputs = _inputs(T, H, E, k, I, S, Ia, seed=0)
    with gk.use_backend("torch"):
        ref_y, ref_grads = _run(inputs, k, S, torch.float64, torch.device("cpu"))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"preset {preset} (H={H} E={E} k={k} I={I} S={S} Ia={Ia}), T={T}")
    print(f"{'backend':<8} {'dtype':<9} {'y':>9} " + " ".join(f"{'d' + n:>9}" for n in ref_grads)
          + "   tol     ok")
    failed = False
    for backend in gk.available_backends():
        for dtype in dtypes:
            try:
                with gk.use_backend(backend):
                    y, grads = _run(inputs, k, S, dtype, device)
            except ValueError as exc:  # a backend that does not run on this device
                print(f"{backend:<8} {str(dtype)[6:]:<9} skipped: {exc}")
                continue
            errs = [_rel(y, ref_y)] + [_rel(grads[n], ref_grads[n]) for n in ref_grads]
            tol = TOLERANCE[dtype]
            ok = all(e <= tol for e in errs)  # NaN compares False: never passes
            failed |= not ok
            print(f"{backend:<8} {str(dtype)[6:]:<9} " + " ".join(f"{e:9.2e}" for e in errs)
                  + f"   {tol:.0e}  {'yes' if ok else 'NO'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
