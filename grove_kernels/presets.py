"""Named layer shapes: what the selfcheck, the tuner and the benchmarks run at.

A preset fixes the Grove layer's shape letters: H hidden, E experts, k selected per token,
I expert intermediate, S experts per group (G = E // S groups = adjugates), Ia adjugate
intermediate, λ adjugate scale. `grove-33b` is the released GroveMoE shape (docs/design.md
§1); the smaller ones let a CPU run every backend in seconds. Add a preset by adding an entry
to PRESETS: nothing else keys on the names.
"""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int  # H
    experts: int  # E
    top_k: int  # k
    intermediate: int  # I
    group_size: int  # S
    adj_intermediate: int  # Ia
    adj_scale: float  # λ
    cpu_tokens: tuple  # default T sweep on a CPU (the GPU sweep is GPU_TOKENS)

    @property
    def groups(self):  # G
        return self.experts // self.group_size

    def as_dict(self):
        d = asdict(self)
        d.pop("cpu_tokens")
        d["groups"] = self.groups
        return d


PRESETS = {
    p.name: p
    for p in (
        Preset("grove-33b", 2048, 128, 8, 768, 2, 128, 0.05, (1, 8, 64)),
        # `small` keeps grove-33b's k/S ratio and E/k so d_t behaves alike, at 1/4 of H.
        Preset("small", 512, 32, 8, 256, 2, 64, 0.05, (1, 8, 64, 256)),
        # `mini`: every backend forward and backward in seconds on a CPU (the selfcheck's).
        Preset("mini", 256, 16, 4, 96, 2, 32, 0.05, (33,)),
        # `tiny` is sized for tests: every GEMM is a few KFLOP, so timing is mostly overhead.
        Preset("tiny", 64, 8, 4, 32, 2, 16, 0.05, (1, 8, 64)),
        # `micro`: the tuner's smoke run under Triton's interpreter.
        Preset("micro", 32, 8, 2, 16, 2, 16, 0.05, (5, 40)),
    )
}


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown {name!r}; known: {sorted(PRESETS)}") from None
