"""grove_kernels.distributed on the CPU (gloo, torch backend, float64) against the single-process
layer, the bytes its dispatch moves, and `python -m bench --ep-world-size`.

One process group per world size P ∈ {1, 2, 4} runs every case of tests/dist_worker.py (a
start per case would cost far more than the cases): the fixture starts P processes once, each
writes {case: metrics}, and the tests below assert them per (P, case). Shapes: H 16, I 8, E 8
(16 for S = 4), Ia 4, k 2 unless a case says otherwise; tokens per rank 5, 3, 7, 1 (uneven).

Processes are forked where that is safe (CUDA not initialised in this process): the children
then share the parent's imported torch, grove_kernels and torch._dynamo (first loaded by a
custom op call, ~5 s of CPU each), which keeps the file to seconds on a 2-core CI machine.
Elsewhere they are spawned. A worker that raises fails the fixture with its traceback.
"""
import json
import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import grove_kernels as gk
from grove_kernels import distributed as gkd

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # bench/ is a top-level folder of the repo
    sys.path.insert(0, REPO_ROOT)

from bench import cli as bench_cli  # noqa: E402
from bench import ep_traffic  # noqa: E402

WORLD_SIZES = (1, 2, 4)
TOL = 1e-12  # float64 (docs/design.md §5 asks fp64 references; here both sides are fp64)
ALL_TO_ALL_CASES = ("uneven", "shard_3d", "no_token_rank", "t0_rank", "one_group", "top1",
                    "s4", "s4_top3")
NUMERIC_CASES = ALL_TO_ALL_CASES + ("allreduce_module", "allreduce_functional", "functional",
                                    "weights_bf16", "weights_fp64")
DEADLINE_S = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_errors(tmp):
    """Every rank's recorded traceback, the earliest (the cause) first."""
    errors = []
    for path in tmp.glob("rank*.error"):
        stamp, _, text = path.read_text().partition("\n")
        errors.append((float(stamp), f"--- {path.stem} ---\n{text}"))
    return "\n".join(text for _, text in sorted(errors))


def _start(fn, nprocs, tmp, start_method):
    """Run fn(rank, nprocs, port, tmp) in nprocs processes. A worker that raises fails the test
    with the tracebacks of the ranks (its own first); a stuck group fails instead of hanging."""
    ctx = mp.start_processes(fn, args=(nprocs, _free_port(), str(tmp)), nprocs=nprocs,
                             join=False, start_method=start_method)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"expert-parallel workers still running after {DEADLINE_S} s")
    except Exception as exc:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        pytest.fail(f"{type(exc).__name__} from the workers:\n{_worker_errors(tmp) or exc}",
                    pytrace=False)


def _run_group(fn, P, tmp, start_method):
    _start(fn, P, tmp, start_method)
    ranks = []
    for r in range(P):
        with open(tmp / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    return ranks


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda P: f"P{P}")
def group(request, tmp_path_factory):
    """(P, [per-rank {case: metrics}]) for one world size."""
    P = request.param
    fork = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    if fork:
        with gk.use_backend("torch"):  # loads what the children would each load again
            gk.grove_topk(torch.randn(2, 4), 2)
    ranks = _run_group(dist_worker.run, P, tmp_path_factory.mktemp(f"ep{P}"),
                       "fork" if fork else "spawn")
    return P, ranks


@pytest.mark.parametrize("case", NUMERIC_CASES)
def test_matches_single_process(group, case):
    """Forward and every gradient (x, w1, w2, a1, a2 of the shard, the router weight summed
    over ranks, or the routing weights / logits) equal the single-process layer's."""
    P, ranks = group
    for r, res in enumerate(ranks):
        metrics = {k: v for k, v in res[case].items() if k != "info"}
        assert len(metrics) >= 7, metrics
        bad = {k: v for k, v in metrics.items() if not v <= TOL}
        assert not bad, f"P={P} rank {r} {case}: {bad}"


def test_routing_extremes_happened(group):
    """The cases exercise what they claim: a rank with T = 0, a rank that receives no token,
    every token on one group (one rank receives everything)."""
    P, ranks = group
    info = {c: [res[c]["info"] for res in ranks] for c in ALL_TO_ALL_CASES}
    assert info["t0_rank"][0]["tokens"] == 0 and sum(info["t0_rank"][0]["send_rows"]) == 0
    if P == 1:
        return
    assert sum(info["no_token_rank"][P - 1]["recv_rows"]) == 0
    assert sum(info["no_token_rank"][P - 1]["send_rows"]) > 0  # it still routes its tokens
    one = info["one_group"]
    E, S = one[0]["num_experts"], one[0]["group_size"]
    owner = ((E // S) // 2) * S // (E // P)
    total = sum(i["tokens"] for i in one)
    assert [sum(i["recv_rows"]) for i in one] == [total if r == owner else 0 for r in range(P)]


@pytest.mark.parametrize("case", ALL_TO_ALL_CASES)
def test_bytes_per_token_from_split_sizes(group, case):
    """Bytes each rank sends per token, counted from the split sizes the dispatch passed to
    all_to_all_single, against bench/ep_traffic's count from the routing: a token goes once to
    each other rank holding one of its experts (not once per expert)."""
    P, ranks = group
    infos = [res[case]["info"] for res in ranks]
    for r in range(P):
        for p in range(P):  # what r sends to p is what p receives from r
            assert infos[r]["send_rows"][p] == infos[p]["recv_rows"][r]
    per_expert_rows = once_rows = 0
    for r, info in enumerate(infos):
        T, H, k, E = info["tokens"], info["hidden"], info["top_k"], info["num_experts"]
        remote = sum(info["send_rows"]) - info["send_rows"][r]
        # fp64 x; k fp64 routing weights (fp64 logits) + k ids bit-cast to fp64
        row_bytes = H * 8 + 2 * k * 8
        ids = torch.tensor(info["topk_ids"], dtype=torch.int64).reshape(T, k)
        counts = ep_traffic.traffic(ids, torch.full((T,), r), P, E, H, elem_bytes=8,
                                    slot_bytes=16)
        once = counts["token-once"]
        assert sum(info["send_rows"]) == once["rows"]
        assert remote == once["remote_rows"]
        assert info["dispatch_x_bytes"] + info["dispatch_meta_bytes"] == remote * row_bytes
        assert info["dispatch_x_bytes"] == once["x_bytes"]
        assert info["dispatch_meta_bytes"] == once["meta_bytes"]
        if T:
            per_token = remote * row_bytes / T
            assert per_token <= (P - 1) * row_bytes  # at most once per other rank
        once_rows += once["remote_rows"]
        per_expert_rows += counts["per-expert"]["remote_rows"]
    # The combine sends every received row back.
    assert sum(i["combine_bytes"] for i in infos) == sum(i["dispatch_x_bytes"] for i in infos)
    assert once_rows <= per_expert_rows
    if case == "one_group" and P > 1:  # both slots of every token on one rank
        assert per_expert_rows == 2 * once_rows > 0


def test_selection_bias_update_is_global(group):
    P, ranks = group
    for res in ranks:
        assert res["selection_bias"]["moved"] > 0.01
        assert res["selection_bias"]["bias"] <= 1e-7


def test_fresh_module_shares_the_router(group):
    P, ranks = group
    for res in ranks:
        for how, got in res["fresh_init"].items():
            assert got == {"gate_equal": True, "shards_distinct": True, "bound_ok": True}, how


def test_meta_init_then_materialise(group):
    P, ranks = group
    for res in ranks:
        assert res["meta_init"] == {"map_ok": True, "bias_fp32_zero": True, "gate_equal": True,
                                    "forward_ok": True, "map_after_double": True}


def test_selection_bias_bad_id_raises_on_every_rank(group):
    P, ranks = group
    for res in ranks:
        err = res["bias_errors"]
        assert err["error"].startswith("topk_ids: values must lie in [0, 8)"), err
        assert err["untouched"] and err["moved_after"], err


def test_errors_raised_on_every_rank(group):
    P, ranks = group
    for res in ranks:
        err = res["errors"]
        if P > 1:  # G = 3 groups
            assert "divisible by the world size" in err["g_not_divisible"], err
        else:
            assert err["g_not_divisible"] == "no error"
        assert "topk_ids" in err["bad_ids"] and "rank(s) [0]" in err["bad_ids"], err
        assert err["dtype"].startswith("w1: expected dtype torch.float32"), err
        assert err["logits"].startswith("router_logits: expected 8 columns"), err
        assert err["after"] == [3, 16]


# ---- without a process group -----------------------------------------------------------------

def test_local_expert_range_and_shards():
    assert gkd.local_expert_range(128, 2, 8, 3) == (48, 64)
    with pytest.raises(ValueError, match="world_size: the 64 groups"):
        gkd.local_expert_range(128, 2, 3, 0)
    with pytest.raises(ValueError, match="group_size"):
        gkd.local_expert_range(9, 2, 1, 0)
    w1, w2 = torch.randn(8, 6, 4), torch.randn(8, 4, 3)
    a1, a2 = torch.randn(4, 2, 4), torch.randn(4, 4, 1)
    s1, s2, b1, b2 = gkd.shard_experts(w1, w2, a1, a2, group_size=2, world_size=2, rank=1)
    assert torch.equal(s1, w1[4:]) and torch.equal(s2, w2[4:])
    assert torch.equal(b1, a1[2:]) and torch.equal(b2, a2[2:])
    with pytest.raises(ValueError, match="a1: expected 4 rows"):
        gkd.shard_experts(w1, w2, a1[:3], a2, group_size=2, world_size=2, rank=1)
    m = gkd.local_expert_map(8, 4, 8)
    assert m.dtype == torch.int32 and m.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]


def test_needs_an_initialized_group():
    if torch.distributed.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        gkd.ExpertParallelGroveMoE(8, 4, 8, 2)


# ---- bench: --ep-world-size ----------------------------------------------------------------

def test_traffic_hand_case():
    # E 8 over P 2 (experts 0-3 on rank 0); token 0 (owned by rank 1) picks 0, 1, 4: rank 0
    # twice and its own rank; token 1 (owned by rank 0) picks 2, 5, 7: itself and rank 1 twice.
    ids = torch.tensor([[0, 1, 4], [2, 5, 7]])
    c = ep_traffic.traffic(ids, torch.tensor([1, 0]), 2, 8, hidden=4, elem_bytes=2)
    assert c["token-once"] == dict(rows=4, remote_rows=2, x_bytes=16, meta_bytes=2 * 3 * 8,
                                   combine_bytes=16)
    assert c["per-expert"] == dict(rows=6, remote_rows=4, x_bytes=32, meta_bytes=32,
                                   combine_bytes=32)
    assert c["released"] == dict(rows=12, remote_rows=8, x_bytes=64, meta_bytes=64,
                                 combine_bytes=64)
    assert ep_traffic.source_ranks(5, 2).tolist() == [0, 0, 0, 1, 1]


def test_bench_ep_option(tmp_path, capsys):
    path = tmp_path / "ep.json"
    rc = bench_cli.main(["--ep-world-size", "1,2,4", "--smoke", "--routing",
                         "uniform,coactive,skewed", "--json", str(path), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("token-once", "per-expert", "released", "meta B/tok", "total B/tok"):
        assert word in out
    with open(path) as f:
        result = json.load(f)
    assert result["kind"] == "ep-traffic" and result["preset"]["name"] == "tiny"
    rows = result["rows"]
    keys = {(r["routing"], r["T"], r["world_size"], r["scheme"]) for r in rows}
    assert keys == {(m, T, P, s) for m in ("uniform", "coactive", "skewed") for T in (1, 16, 64)
                    for P in (1, 2, 4) for s in ep_traffic.SCHEMES}
    H = result["preset"]["hidden"]
    by = {(r["routing"], r["T"], r["world_size"], r["scheme"]): r for r in rows}
    for (m, T, P, s), r in by.items():
        assert r["x_bytes_per_token"] == pytest.approx(r["remote_rows_per_token"] * H * 2)
        assert r["combine_bytes_per_token"] == r["x_bytes_per_token"]
        once, per, rel = (by[(m, T, P, n)] for n in ep_traffic.SCHEMES)
        assert once["x_bytes_per_token"] <= per["x_bytes_per_token"]
        assert rel["x_bytes_per_token"] == pytest.approx(2 * per["x_bytes_per_token"])
        if P == 1:
            assert r["total_bytes_per_token"] == 0 and r["vs_token_once"] is None
    # coactive routing puts whole groups on a rank: token-once sends far less than per-expert
    assert by[("coactive", 64, 4, "per-expert")]["vs_token_once"] > 1.5


@pytest.mark.parametrize("argv, message", [
    (["--ep-world-size", "3"], "do not divide"),
    (["--ep-world-size", "2", "--csv", "x.csv"], "--csv"),
    (["--ep-world-size", "0"], "positive"),
])
def test_bench_ep_option_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(argv + ["--smoke"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---- GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_nccl_world_size_1(tmp_path):
    """The NCCL path at world size 1 (multi-GPU machines are not lent here): forward and
    gradients equal the single-process layer; a forward syncs the host once more than it."""
    (res,) = _run_group(dist_worker.run_nccl_smoke, 1, tmp_path, "spawn")
    out = res["nccl"]
    syncs = out.pop("syncs")
    bad = {k: v for k, v in out.items() if not v <= 1e-5}
    assert not bad, out
    assert syncs["ep"] == syncs["single"] + 1, syncs
