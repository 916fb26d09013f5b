"""Fixtures of the pytest-benchmark suite (bench/test_bench_layer.py); test_grouped_mm_layer.py
and test_anchors.py beside it need none.

`pytest bench --benchmark-only` times every variant; `pytest bench --benchmark-disable` runs
each once as a correctness test. `pytest tests` never collects this folder (the project's
testpaths is ["tests"] and tests/ does not import it as a test package).

One problem per session: preset `small` (H 512, E 32, k 8, I 256, S 2, Ia 64), T = 64,
uniform routing; fp32 on a CPU, bf16 on a GPU.
    logits [T, E] -> gk.grove_topk -> topk_weights [T, k], topk_ids [T, k]
    weights w1 [E, 2I, H], w2 [E, H, I], a1 [G, 2Ia, H], a2 [G, H, Ia]; x, g [T, H]
"""
from dataclasses import dataclass

import pytest
import torch

from grove_kernels import _validate
from bench import presets, routing, variants

SUITE_PRESET = "small"
SUITE_TOKENS = 64


@dataclass
class Problem:
    preset: object
    device: torch.device
    dtype: torch.dtype
    weights: dict
    x: torch.Tensor
    grad_out: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


# Files whose module fixtures run the bench in a subprocess: under `--dist loadgroup`
# (scripts/test.sh) one xdist worker runs all of a file's tests, so each runs once.
_ONE_WORKER = ("test_bench_smoke.py", "test_anchors.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in _ONE_WORKER:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.fixture(scope="session")
def bench_problem():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = presets.get_preset(SUITE_PRESET)
    logits = routing.make_logits("uniform", SUITE_TOKENS, preset)
    topk_weights, topk_ids = routing.route(logits, preset, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SUITE_TOKENS, preset.hidden, generator=gen).to(device, dtype)
    grad_out = torch.randn(SUITE_TOKENS, preset.hidden, generator=gen).to(device, dtype)
    # Host checks read ids back each call; serving turns them off, and so do timings.
    with _validate.value_checks(False):
        yield Problem(preset, device, dtype, variants.make_weights(preset, device, dtype), x,
                      grad_out, topk_weights, topk_ids)
