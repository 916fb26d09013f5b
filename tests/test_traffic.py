"""The traffic model (grove_kernels/traffic.py, triton/traffic.py, cuda/traffic.py,
`python -m bench --traffic`): one row recomputed by hand, and the launch lists held against
what the backends actually launch (their kernels replaced by recorders: nothing runs).

By hand: T = 3, k = 2, E = 4, S = 2 (G = 2), H = 16, I = 8, Ia = 4, bf16 (2 bytes), routing
    token 0 -> experts 0, 1   (one group: one adjugate row, group 0)
    token 1 -> experts 2, 0   (groups 1, 0: two adjugate rows)
    token 2 -> experts 1, 3   (groups 0, 1: two adjugate rows)
expert rows: e0 {t0, t1}, e1 {t0, t2}, e2 {t1}, e3 {t2}: R_e = 6; adjugate rows: g0 {t0, t1, t2},
g1 {t1, t2}: 5 real of T*min(k, G) = 6; R = 12. The H200 tiles at 1.5 rows per expert (config
heuristic, rows <= 16): BM 16; GEMM-1 BN 32; GEMM-2 BN 64.
"""
import torch

from grove_kernels.plan import build_plan
from grove_kernels.traffic import Launch, plan_launches, total
from grove_kernels.triton import traffic as triton_traffic

T, k, E, S, G, H, I, Ia = 3, 2, 4, 2, 2, 16, 8, 4
IDS = torch.tensor([[0, 1], [2, 0], [1, 3]], dtype=torch.int32)
W = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
SHAPES = ((E, 2 * I, H), (E, H, I), (G, 2 * Ia, H), (G, H, Ia))
B = 2  # bf16


def _by_hand():
    """The launches of a triton sections grove forward, every byte counted here."""
    P = E + G  # problems
    rows_e, rows_a = 6, 5  # real rows per section
    tokens = 3  # distinct tokens gathered
    sched = (3 * P + 1) * 4  # block_offsets [P+1], start [P], count [P] int32
    # plan stage: 6 slots in one block of 64; histogram columns E+1 + G+1 = 8.
    ids_in = 6 * (4 + 4)  # int32 ids + fp32 weights
    rows_out = 12 * 8 + 12 * 4 + 3 * 4 * 8  # row_token, row_weight, token_rows [T, 2k]
    offsets = 5 * 8 + 3 * 8  # expert_offsets [E+1], adjugate_offsets [G+1]
    slot_out = 3 * 4 * 4 + 3 * 4 + 3 * 2 * 2  # token_weight, token_mask [T, 2k], group_match
    keys, counts = 2 * 6 * 4, 1 * 8 * 4  # two sort keys per slot, the [1, 8] histogram
    plan = [
        Launch("plan slots", 1, 0, ids_in, slot_out + keys + counts, 0),
        Launch("plan scan", 2, 0, counts, counts + 2 * 8 * 4, 0),
        Launch("plan offsets", 1, 0, 8 * 4, 8 * 4 + offsets, 0),
        Launch("plan scatter", 1, 0, keys + counts + 8 * 4 + 6 * (4 + 1), rows_out, 0),
    ]
    # GEMM-1: grid (bound, n tiles) = (cdiv(6, 16) + cdiv(6, 16) + P, cdiv(8, 32)) = (8, 1);
    # one row block per problem (all six have rows) works, 2 programs exit.
    x = tokens * H * B
    w1 = E * (2 * I) * H * B + G * (2 * Ia) * H * B
    z = rows_e * I * B + rows_a * Ia * B
    gemm1 = (8, 2, x + w1 + (rows_e + rows_a) * 8 + sched, z,
             2 * (rows_e * 2 * I * H + rows_a * 2 * Ia * H))
    # GEMM-2: grid (8, cdiv(16, 64) = 1); z rows in, w2 / a2, row_token + row_weight per row.
    w2 = E * H * I * B + G * H * Ia * B
    o = (rows_e + rows_a) * H * B
    gemm2 = (8, 2, z + w2 + (rows_e + rows_a) * (8 + 4) + sched, o,
             2 * (rows_e * H * I + rows_a * H * Ia))
    # combine: grid (T, cdiv(16, 16)); the [T, 2k] mask, then 11 real rows (index + H values).
    comb = (3, 0, T * 4 + 11 * (8 + H * B), T * H * B, 0)
    return plan, [gemm1, gemm2, comb]


def test_triton_sections_row_by_hand():
    plan = build_plan(IDS, W, E, S, 0.05)
    got = plan_launches(plan) + triton_traffic.launches(plan, (T, H), SHAPES, torch.bfloat16,
                                                        "sections", "fwd", "NVIDIA H200")
    hand_plan, hand_gemms = _by_hand()
    assert [tuple(g[:6]) for g in got[:4]] == [tuple(h[:6]) for h in hand_plan]
    assert got[4].name.startswith("torch: block schedule")
    kernels = [(g.programs, g.idle_programs, g.read_bytes, g.write_bytes, g.flops)
               for g in got[5:]]
    assert [g.name for g in got[5:]] == ["GEMM-1 + SwiGLU", "GEMM-2", "combine"]
    assert kernels == hand_gemms
    hbm, flops = total(got)
    assert hbm == (sum(h.read_bytes + h.write_bytes for h in hand_plan)
                   + got[4].read_bytes + got[4].write_bytes
                   + sum(g[2] + g[3] for g in hand_gemms))
    assert flops == sum(g[4] for g in hand_gemms)


def test_plain_moves_less_than_grove():
    grove = build_plan(IDS, W, E, S, 0.05)
    plain = build_plan(IDS, W, E)
    shapes = SHAPES[:2] + (None, None)
    for layer, plan, ws in (("grove", grove, SHAPES), ("plain", plain, shapes)):
        launches = triton_traffic.launches(plan, (T, H), ws, torch.bfloat16, "sections",
                                           "fwd+bwd", "NVIDIA H200")
        if layer == "grove":
            g = total(launches)
        else:
            p = total(launches)
    assert p[0] < g[0] and p[1] < g[1]


class _Recorder:
    """Stands in for a Triton kernel: kernel[grid](...) records (name, programs), runs nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        programs = 1
        for g in grid:
            programs *= g
        return lambda *args, **kwargs: self.log.append((self.name, programs))


def _case(T_, E_, grove, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E_, generator=g)[:k] for _ in range(T_)]).int()
    w = torch.rand(T_, k, generator=g)
    plan = build_plan(ids, w, E_, S if grove else 0, 0.05)
    shapes = ((E_, 2 * I, H), (E_, H, I)) + (((E_ // S, 2 * Ia, H), (E_ // S, H, Ia)) if grove
                                             else (None, None))
    return plan, shapes


def _weights(shapes):
    from grove_kernels.experts import Weights

    return Weights(*(torch.zeros(s, dtype=torch.bfloat16) if s else None for s in shapes))


import pytest  # noqa: E402


@pytest.mark.parametrize("T_,E_,grove", [(3, 4, True), (40, 4, True), (40, 4, False),
                                         (200, 8, True)])
def test_triton_launches_match_the_backend(monkeypatch, T_, E_, grove):
    """Every Triton kernel the backend launches, in order, with the grid the model counts."""
    from grove_kernels.experts import Activations
    from grove_kernels.triton import backend, combine, config as cfg, gemm1_swiglu
    from grove_kernels.triton import gemm_k_grouped, gemm_m_grouped

    log = []
    for module, attr in ((gemm1_swiglu, "_gemm1_swiglu_kernel"),
                         (gemm_m_grouped, "_gemm_m_grouped_kernel"),
                         (gemm_k_grouped, "_gemm_k_grouped_kernel"),
                         (combine, "_combine_rows_kernel")):
        monkeypatch.setattr(module, attr, _Recorder(attr, log))
    plan, shapes = _case(T_, E_, grove)
    weights = _weights(shapes)
    conf = cfg.for_device("NVIDIA H200", T_, k, E_, H, I, Ia if grove else 0, torch.bfloat16)
    x = torch.zeros(T_, H, dtype=torch.bfloat16)
    act = Activations.empty(plan, weights, x.dtype, x.device)
    with cfg.forced(conf):
        backend.forward(x, weights, plan, False, x.clone(), act)
        backend.backward(x, x, weights, plan, False, act,
                         (x.clone(),) + tuple(torch.empty_like(t) if t is not None else None
                                              for t in weights))
    model = triton_traffic.launches(plan, (T_, H), shapes, torch.bfloat16, "sections",
                                    "fwd+bwd", "NVIDIA H200")
    kernels = [m for m in model if not m.name.startswith("torch:")]
    assert [m.programs for m in kernels] == [n for _, n in log]
    names = {"_gemm1_swiglu_kernel": "GEMM-1", "_gemm_m_grouped_kernel": "m",
             "_gemm_k_grouped_kernel": "dW", "_combine_rows_kernel": "combine"}
    kinds = [names[n] for n, _ in log]
    assert kinds == ["GEMM-1", "m", "combine", "m", "dW", "dW", "m", "combine"]
    assert sum(m.idle_programs for m in kernels) > 0  # the sections layout's bound


# settings.fuse_swiglu, settings.FUSE_SWIGLU_AUTO -> whether an inference forward fuses GEMM-1
_FUSE_MODES = {"0": (False, True, False), "1": (True, False, True),
               "auto-plain": ("auto", False, False), "auto-fused": ("auto", True, True)}


def _set_fuse(monkeypatch, mode):
    """Select the cuda GEMM-1 as GROVE_CUDA_FUSE_SWIGLU / FUSE_SWIGLU_AUTO would. Returns whether
    the inference forward is expected to fuse."""
    from grove_kernels import settings as settings_module

    fuse, auto, fused = _FUSE_MODES[mode]
    monkeypatch.setattr(settings_module.Settings, "fuse_swiglu", fuse)
    monkeypatch.setattr(settings_module, "FUSE_SWIGLU_AUTO", auto)
    return fused


def _fused_gemm1s(log):
    return sum(op == "grouped_gemm" and "swiglu" in kernel for op, kernel in log)


@pytest.mark.parametrize("fuse", list(_FUSE_MODES))
@pytest.mark.parametrize("T_,E_,grove", [(3, 4, True), (40, 4, False), (300, 4, True)])
def test_cuda_launches_match_the_backend(monkeypatch, T_, E_, grove, fuse):
    """Every op the cuda backend calls, in order, with the GEMM kernel the model counts; the
    model takes the backend's GEMM-1 decision (fused only for the inference forward)."""
    from grove_kernels.cuda import backend
    from grove_kernels.cuda import traffic as cuda_traffic
    from grove_kernels.experts import Activations

    fused = _set_fuse(monkeypatch, fuse)
    log = []
    _record_cuda_ops(monkeypatch, backend.lib, log)
    plan, shapes = _case(T_, E_, grove)
    weights = _weights(shapes)
    x = torch.zeros(T_, H, dtype=torch.bfloat16)
    act = Activations.empty(plan, weights, x.dtype, x.device)
    backend.forward(x, weights, plan, False, x.clone(), None)
    backend.forward(x, weights, plan, False, x.clone(), act)
    backend.backward(x, x, weights, plan, False, act,
                     (x.clone(),) + tuple(torch.empty_like(t) if t is not None else None
                                          for t in weights))
    model = []
    for pass_ in ("fwd", "fwd+bwd"):
        model += cuda_traffic.launches(plan, (T_, H), shapes, torch.bfloat16, "sections",
                                       pass_, "NVIDIA H200")
    ops = [op for op in map(_cuda_op_of, (m.name for m in model)) if op is not None]
    assert ops == log
    assert _fused_gemm1s(log) == int(fused)


def test_bench_traffic_cli(tmp_path, capsys):
    """python -m bench --traffic: a row per backend x layout x variant x pass, each launch
    listed, without a GPU; the folded triton layer idles no more programs than the sections
    one (its only idle programs are row blocks past the plan's last, as the plain layer's)."""
    import json

    from bench import cli

    path = tmp_path / "traffic.json"
    assert cli.main(["--traffic", "--preset", "tiny", "--tokens", "5,33", "--routing",
                     "uniform,coactive", "--json", str(path), "--quiet"]) == 0
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 2 * 2 * 2  # routing, T, variant, layout, backend, pass
    for r in rows:
        assert {"backend", "layout", "variant", "tokens", "routing", "hbm_bytes", "flops",
                "launches"} <= set(r)
        assert r["hbm_bytes"] == sum(l["read_bytes"] + l["write_bytes"] for l in r["launches"])
        assert all({"name", "programs", "idle_programs", "read_bytes", "write_bytes",
                    "flops"} <= set(l) for l in r["launches"])
    idle = {(r["routing"], r["tokens"], r["pass"], r["layout"]): r["idle_programs"]
            for r in rows if r["backend"] == "triton" and r["variant"] == "grove"}
    for (routing, T_, pass_, layout), n in idle.items():
        if layout == "folded":
            assert n <= idle[(routing, T_, pass_, "sections")]
    assert "x plain" in capsys.readouterr().out


_CUDA_OPS = {  # op -> index of the argument it returns
    "gather_rows": -1, "swiglu_fwd": -1, "swiglu_bwd": -2, "combine_rows": -1,
    "rows_dot_scale": 0, "grouped_gemm": 2, "swiglu_folded_fwd": None, "scale_folded": -1,
    "swiglu_folded_bwd": None}


def _record_cuda_ops(monkeypatch, lib, log):
    def rec(op, result):
        def f(*args, **kwargs):
            log.append((op, args[5] if op == "grouped_gemm" else None))
            return args[result] if result is not None else None
        return f

    for op, result in _CUDA_OPS.items():
        if hasattr(lib, op):
            monkeypatch.setattr(lib, op, rec(op, result))


def _cuda_op_of(name):
    """The ext op a modelled launch of cuda/traffic.py stands for (None: not an ext op)."""
    if name.startswith("torch:") or ": args fill" in name or ": zero empty" in name:
        return None
    if "[" in name:
        return ("grouped_gemm", name.split("[")[1].rstrip("]"))
    folded = "(folded)" in name
    for prefix, op, op_folded in (("gather", "gather_rows", "gather_rows"),
                                  ("SwiGLU'", "swiglu_bwd", "swiglu_folded_bwd"),
                                  ("SwiGLU", "swiglu_fwd", "swiglu_folded_fwd"),
                                  ("scale z", "rows_dot_scale", "scale_folded"),
                                  ("combine", "combine_rows", "combine_rows")):
        if name.startswith(prefix):
            return (op_folded if folded else op, None)
    raise AssertionError(f"unmapped launch {name}")


@pytest.mark.parametrize("fuse", list(_FUSE_MODES))
@pytest.mark.parametrize("T_,E_", [(3, 4), (40, 4), (300, 8)])
def test_cuda_folded_launches_match_the_backend(monkeypatch, T_, E_, fuse):
    """The folded layout's ops, in order, with the GEMM kernel the model counts; the model
    takes the backend's GEMM-1 decision."""
    folded = pytest.importorskip("grove_kernels.cuda.folded")
    from grove_kernels.cuda import traffic as cuda_traffic
    from grove_kernels.experts import Activations
    from grove_kernels.plan_folded import build_folded_plan

    fused = _set_fuse(monkeypatch, fuse)
    log = []
    _record_cuda_ops(monkeypatch, folded.lib, log)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(E_, generator=g)[:k] for _ in range(T_)]).int()
    plan = build_folded_plan(ids, torch.rand(T_, k, generator=g), E_, S, 0.05)
    shapes = ((E_, 2 * I, H), (E_, H, I), (E_ // S, 2 * Ia, H), (E_ // S, H, Ia))
    weights = _weights(shapes)
    x = torch.zeros(T_, H, dtype=torch.bfloat16)
    act = Activations.empty(plan, weights, x.dtype, x.device)
    folded.forward(x, weights, plan, False, x.clone(), None)
    folded.forward(x, weights, plan, False, x.clone(), act)
    folded.backward(x, x, weights, plan, False, act,
                    (x.clone(),) + tuple(torch.empty_like(t) for t in weights))
    model = []
    for pass_ in ("fwd", "fwd+bwd"):
        model += cuda_traffic.launches(plan, (T_, H), shapes, torch.bfloat16, "folded", pass_,
                                       "NVIDIA H200")
    ops = [op for op in map(_cuda_op_of, (m.name for m in model)) if op is not None]
    assert ops == log
    assert _fused_gemm1s(log) == int(fused)


@pytest.mark.parametrize("schedule,programs", [("tiles", None), ("persistent", "5"),
                                               ("persistent", "100000")])
@pytest.mark.parametrize("T_,E_,routing", [(3, 4, "uniform"), (40, 4, "uniform"),
                                           (200, 8, "uniform"), (200, 8, "coactive")])
def test_triton_folded_launches_match_the_backend(monkeypatch, T_, E_, routing, schedule,
                                                  programs):
    """The folded layout's Triton kernels, in order, with the grid the model counts, on both
    schedules (GROVE_TRITON_SCHEDULE; GROVE_TRITON_PROGRAMS sets the persistent program count
    for the backend and the model alike)."""
    monkeypatch.setenv("GROVE_TRITON_SCHEDULE", schedule)
    if programs is not None:
        monkeypatch.setenv("GROVE_TRITON_PROGRAMS", programs)
    gemm_folded = pytest.importorskip("grove_kernels.triton.gemm_folded")
    from grove_kernels.experts import Activations
    from grove_kernels.plan_folded import build_folded_plan
    from grove_kernels.triton import backend, combine, config as cfg, wgrad_folded

    log = []
    kernels = ((gemm_folded, "_folded_gemm1_kernel"), (gemm_folded, "_folded_k_concat_kernel"),
               (gemm_folded, "_folded_dgemm2_kernel"), (wgrad_folded, "_folded_wgrad_kernel"),
               (combine, "_combine_rows_kernel"))
    for module, attr in kernels:
        monkeypatch.setattr(module, attr, _Recorder(attr, log))
    g = torch.Generator().manual_seed(2)
    if routing == "coactive":  # whole groups: half the rows lead
        groups = torch.stack([torch.randperm(E_ // S, generator=g)[:k // S] for _ in range(T_)])
        ids = (groups[:, :, None] * S + torch.arange(S)).flatten(1).int()
    else:
        ids = torch.stack([torch.randperm(E_, generator=g)[:k] for _ in range(T_)]).int()
    plan = build_folded_plan(ids, torch.rand(T_, k, generator=g), E_, S, 0.05)
    shapes = ((E_, 2 * I, H), (E_, H, I), (E_ // S, 2 * Ia, H), (E_ // S, H, Ia))
    weights = _weights(shapes)
    conf = cfg.for_device("NVIDIA H200", T_, k, E_, H, I, Ia, torch.bfloat16)
    x = torch.zeros(T_, H, dtype=torch.bfloat16)
    act = Activations.empty(plan, weights, x.dtype, x.device)
    with cfg.forced(conf):
        backend.forward(x, weights, plan, False, x.clone(), None)
        backend.forward(x, weights, plan, False, x.clone(), act)
        backend.backward(x, x, weights, plan, False, act,
                         (x.clone(),) + tuple(torch.empty_like(t) for t in weights))
    model = []
    for pass_ in ("fwd", "fwd+bwd"):
        model += triton_traffic.launches(plan, (T_, H), shapes, torch.bfloat16, "folded",
                                         pass_, "NVIDIA H200")
    launched = [m for m in model if not m.name.startswith("torch:")]
    assert [m.programs for m in launched] == [n for _, n in log]
    assert [n for n, _ in log] == [kernels[i][1] for i in (0, 1, 4) * 2 + (2, 3, 3, 1, 4)]
    # Tiles: only row blocks past the plan's last one idle (the grid bound), never adjugate
    # tiles. Persistent: min(programs, bound x N tiles) programs, idle beyond the real items.
    bound = -(-T_ * k // conf.block_m) + E_
    count = plan.expert_offsets.diff()
    real_blocks = int(((count + conf.block_m - 1) // conf.block_m).sum())
    n_tiles = {"GEMM-1": -(-I // conf.gemm1.bn),
               "GEMM-2": -(-H // cfg.folded_gemm2_rows(conf).bn),
               "dGEMM-2": -(-I // cfg.folded_dgemm2_rows(conf).bn),
               "dGEMM-1": -(-H // conf.rows.bn)}
    for m in launched:
        if m.name.startswith(("GEMM", "dGEMM")):
            n = n_tiles[m.name.split(" ")[0]]
            if programs is None:
                assert m.programs == bound * n
                assert m.idle_programs == (bound - real_blocks) * n
            else:
                assert m.programs == min(int(programs), bound * n)
                assert m.idle_programs == max(0, m.programs - real_blocks * n)
        else:
            assert m.idle_programs == 0


def test_for_device_models_the_gpu_even_under_the_interpreter():
    """config.for_device gives the compiled run's tiles, also where TRITON_INTERPRET is set
    (the tests' case): the traffic model never counts the interpreter's small tiles."""
    from grove_kernels.triton import config as cfg

    big = cfg.for_device("NVIDIA H200", 16384, 8, 128, 2048, 768, 128, torch.bfloat16)
    small = cfg.for_device("NVIDIA H200", 16, 8, 128, 2048, 768, 128, torch.bfloat16)
    assert (big.block_m, small.block_m) == (128, 16)
    assert big.gemm1.bn == 64 and small.gemm1.bn == 32
    fp32 = cfg.for_device("NVIDIA H200", 16384, 8, 128, 2048, 768, 128, torch.float32)
    assert fp32.gemm1.bk == big.gemm1.bk // 2
