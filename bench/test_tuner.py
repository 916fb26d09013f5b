"""The Triton tile tuner (python -m grove_kernels.triton.tune): its smoke run, in a process of
its own under Triton's interpreter, writes configs.json buckets keyed by rows per expert."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke tuner runs under the interpreter")
def test_tuner_smoke_writes_buckets(tmp_path):
    out = tmp_path / "configs.json"
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "grove_kernels.triton.tune", "--smoke",
                           "--tokens", "5,40", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    buckets = json.loads(out.read_text())["interpreter"]["32,16,16,8,2"]
    assert [b["T"] for b in buckets] == [5, 40]
    assert buckets[0]["max_rows_per_problem"] == (5 * 2 / 8 + 40 * 2 / 8) / 2
    assert buckets[1]["max_rows_per_problem"] == float("inf")
    for b in buckets:
        assert b["fwd_us"] > 0 and b["fwd_bwd_us"] > 0 and len(b["wgrad"]) == 5
