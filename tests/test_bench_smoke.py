"""The benchmark CLI end to end, and its cost model on a hand-computed case.

`python -m bench --smoke --json PATH` runs once per session in a subprocess (CPU, tiny preset
H 64, E 8, k 4, I 32, S 2, Ia 16; T = 1, 16, 64; fwd and fwd+bwd); the tests read its JSON.
The cost-model tests import bench.cost directly with a fixed routing topk_ids [T=2, k=3].
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # bench/ is a top-level folder of the repo, not an installed package
    sys.path.insert(0, REPO_ROOT)

from bench import cost  # noqa: E402
from bench.presets import Preset  # noqa: E402

TOP_KEYS = ("device", "torch", "commit", "date", "ceilings", "rows")
ROW_KEYS = ("preset", "routing", "T", "pass", "variant", "backend", "us", "tflops", "gbps",
            "floor_us", "pct_floor", "distinct_groups")
RATE_KEYS = ("us", "tflops", "gbps", "floor_us", "pct_floor", "distinct_groups")
REQUIRED_VARIANTS = ("grove", "plain", "grove-2call")
SMOKE_TOKENS = (1, 16, 64)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with open(path) as f:
        return json.load(f), proc.stdout


def test_top_level_schema(smoke):
    result, _ = smoke
    for key in TOP_KEYS:
        assert key in result, key
    assert result["commit"] is None or len(result["commit"]) == 40
    for key in ("copy_GBps", "matmul_TFLOPs"):
        v = result["ceilings"][key]
        assert isinstance(v, float) and math.isfinite(v) and v > 0, (key, v)
    assert result["rows"], "no rows"


def test_rows_schema_and_numbers(smoke):
    result, _ = smoke
    for row in result["rows"]:
        for key in ROW_KEYS:
            assert key in row, (key, row)
        assert row["pass"] in ("fwd", "fwd+bwd")
        assert row["preset"] == "tiny" and row["T"] in SMOKE_TOKENS
        for key in RATE_KEYS:
            v = row[key]
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (key, row)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", REQUIRED_VARIANTS)
def test_variant_present_for_every_T(smoke, variant, pass_):
    result, _ = smoke
    got = {r["T"] for r in result["rows"] if r["variant"] == variant and r["pass"] == pass_}
    skipped = [s for s in result.get("skipped", []) if s["variant"] == variant]
    assert got == set(SMOKE_TOKENS), f"{variant} {pass_}: T {sorted(got)}; skipped: {skipped}"


def test_rows_are_checked_correct(smoke):
    result, _ = smoke
    bad = [(r["variant"], r["backend"], r["pass"], r["T"], r.get("rel_err"))
           for r in result["rows"] if r.get("check") != "ok"]
    assert not bad, bad


def test_rows_follow_the_cost_model(smoke):
    """Rates, floor and % of floor are the JSON's own flops/bytes/us and ceilings combined."""
    result, _ = smoke
    copy, mm = result["ceilings"]["copy_GBps"], result["ceilings"]["matmul_TFLOPs"]
    for r in result["rows"]:
        us = r["us"]
        assert r["tflops"] == pytest.approx(r["flops"] / (us * 1e6), rel=1e-9)
        assert r["gbps"] == pytest.approx(r["bytes"] / (us * 1e3), rel=1e-9)
        floor = max(r["bytes"] / (copy * 1e3), r["flops"] / (mm * 1e6))
        assert r["floor_us"] == pytest.approx(floor, rel=1e-9)
        assert r["pct_floor"] == pytest.approx(100 * floor / us, rel=1e-9)


def test_grove_flops_exceed_plain_by_the_adjugates(smoke):
    """Per (T, pass): grove − plain FLOPs = (1 or 3) · 2 · Σ d_t · 3 · H · Ia, d from the JSON."""
    result, _ = smoke
    H, Ia = 64, 16
    by_key = {(r["T"], r["pass"], r["variant"]): r for r in result["rows"]}
    for T in SMOKE_TOKENS:
        for pass_, mult in (("fwd", 1), ("fwd+bwd", 3)):
            g, p = by_key[(T, pass_, "grove")], by_key[(T, pass_, "plain")]
            assert g["distinct_groups"] == p["distinct_groups"]
            assert 2 <= g["distinct_groups"] <= 4  # k/S ≤ d_t ≤ min(k, G) at k 4, S 2, G 4
            extra = mult * 2 * g["distinct_groups"] * T * 3 * H * Ia
            assert g["flops"] - p["flops"] == pytest.approx(extra, rel=1e-9)
            assert p["flops"] == pytest.approx(mult * 2 * T * 4 * 3 * H * 32, rel=1e-12)


def test_distinct_groups_match_the_routing(smoke):
    """The JSON's d is the mean over tokens of the seeded routing the runner used."""
    from bench import presets, routing

    result, _ = smoke
    tiny = presets.get_preset("tiny")
    for T in SMOKE_TOKENS:
        _, ids = routing.route(routing.make_logits("uniform", T, tiny), tiny, "cpu")
        d = cost.distinct_groups_per_token(ids, tiny.group_size).double().mean().item()
        rows = [r for r in result["rows"] if r["T"] == T]
        assert rows and all(r["distinct_groups"] == pytest.approx(d, rel=1e-12) for r in rows)


def test_table_printed(smoke):
    _, stdout = smoke
    for word in ("TFLOP/s", "GB/s", "%floor", *REQUIRED_VARIANTS):
        assert word in stdout, word


HAND = Preset("hand", hidden=4, experts=8, top_k=3, intermediate=2, group_size=2,
              adj_intermediate=1, adj_scale=0.05, cpu_tokens=())
# token 0 picks experts 0, 1 (group 0) and 4 (group 2): d = 2; token 1 picks 2, 5, 7
# (groups 1, 2, 3): d = 3. Experts touched {0, 1, 2, 4, 5, 7} = 6, groups touched {0..3} = 4.
HAND_IDS = torch.tensor([[0, 1, 4], [2, 5, 7]], dtype=torch.int32)


def test_distinct_groups_hand_case():
    assert cost.distinct_groups_per_token(HAND_IDS, 2).tolist() == [2, 3]
    assert cost.distinct_groups_per_token(HAND_IDS, 1).tolist() == [3, 3]
    assert cost.distinct_groups_per_token(HAND_IDS, 4).tolist() == [2, 2]


@pytest.mark.parametrize(
    "adjugates, pass_, flops, nbytes",
    [
        # experts 2·T·k·3·H·I = 2·2·3·3·4·2 = 288; adjugates 2·(2+3)·3·H·Ia = 120
        # bytes fp32: weights 6·3·4·2 + 4·3·4·1 = 144 + 48, activations 2·T·H = 16 elements
        (True, "fwd", 408, (144 + 48 + 16) * 4),
        (False, "fwd", 288, (144 + 16) * 4),
        # fwd+bwd: 3× FLOPs; 3× weights + 5·T·H activations
        (True, "fwd+bwd", 3 * 408, (3 * 192 + 40) * 4),
        (False, "fwd+bwd", 3 * 288, (3 * 144 + 40) * 4),
    ],
)
def test_layer_cost_hand_case(adjugates, pass_, flops, nbytes):
    c = cost.layer_cost(HAND_IDS, HAND, adjugates=adjugates, pass_=pass_, elem_bytes=4)
    assert c.flops == flops
    assert c.bytes == nbytes
    assert c.distinct_groups == 2.5
    assert c.experts_touched == 6


def test_floor_takes_the_slower_roof():
    c = cost.layer_cost(HAND_IDS, HAND, adjugates=True, pass_="fwd", elem_bytes=4)
    # 832 bytes at 1e-3 GB/s = 832 µs; 408 FLOPs at 1e-6 TFLOP/s = 408 µs -> memory-bound
    assert cost.floor_us(c, copy_gbps=1e-3, matmul_tflops=1e-6) == pytest.approx(832)
    assert cost.floor_us(c, copy_gbps=1e-2, matmul_tflops=1e-6) == pytest.approx(408)
    m = cost.row_metrics(c, 1664.0, 1e-3, 1e-6)
    assert m["pct_floor"] == pytest.approx(50.0)
    assert m["tflops"] == pytest.approx(408 / 1664e6)
