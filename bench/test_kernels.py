"""bench.kernels on a CPU: one table and one JSON record per call, kernels summed per call."""
import json

from bench import kernels


def test_kernel_tables_and_json(tmp_path, capsys):
    path = tmp_path / "k.json"
    assert kernels.main(["--tokens", "5", "--backends", "torch", "--variants", "grove,plain",
                         "--layout", "default,folded", "--iters", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "T=5 uniform fwd grove/torch [sections]" in out
    assert "T=5 uniform fwd grove/torch [folded]" in out and "plain/torch\n" in out
    record = json.loads(path.read_text())
    calls = {(c["variant"], c["layout"]) for c in record["calls"]}
    assert calls == {("grove", "sections"), ("grove", "folded"), ("plain", None)}
    for call in record["calls"]:
        assert call["kernels"] and all(k["us"] > 0 and k["calls"] > 0 for k in call["kernels"])


def test_kernel_times_counts_per_iteration():
    import torch

    a = torch.randn(64, 64)
    rows = kernels.kernel_times(lambda: (a @ a, a @ a), iters=3, device_type="cpu")
    mm = [r for r in rows if r[0] == "aten::matmul"]
    assert mm and mm[0][1] == 2.0
