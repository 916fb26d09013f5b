"""The benchmark CLI end to end, its outputs (plot, results folder, progress bar), and its
cost model on a hand-computed case.

`python -m bench --smoke --json PATH` runs once per session in a subprocess (CPU, tiny preset
H 64, E 8, k 4, I 32, S 2, Ia 16; T = 1, 16, 64; fwd and fwd+bwd); the tests read its JSON.
A second, smaller smoke run (T = 1, 16; grove and plain) exercises `--results-dir` and, where
matplotlib is importable, `--plot`; a third and fourth run with stderr on a pseudo-terminal
check that the progress bar is drawn there and that `--quiet` silences it. The plot and
progress modules are also tested in-process on hand-made results. matplotlib is optional: the
checks that draw skip without it (CI does not install it).
The cost-model tests import bench.cost directly with a fixed routing topk_ids [T=2, k=3].
"""
import importlib.util
import io
import json
import math
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # bench/ is a top-level folder of the repo, not an installed package
    sys.path.insert(0, REPO_ROOT)

from bench import cost, plot, progress, report  # noqa: E402
from bench.presets import Preset  # noqa: E402

TOP_KEYS = ("device", "torch", "commit", "date", "ceilings", "rows")
ROW_KEYS = ("preset", "routing", "T", "pass", "variant", "layout", "backend", "us", "tflops",
            "gbps", "floor_us", "pct_floor", "distinct_groups")
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
    assert result["complete"] is True


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


GROUPED_MM_VARIANTS = ("grouped_mm", "grouped_mm-plain", "grouped_mm-index_add",
                       "grouped_mm-index_add-plain")


@pytest.mark.parametrize("variant", GROUPED_MM_VARIANTS)
def test_grouped_mm_variants_run_or_say_why(smoke, variant):
    """torch._grouped_mm runs on a CPU in torch 2.13 (fp32): every T and pass, checked ok; a
    torch without it has the probe's reason in `skipped` instead."""
    result, _ = smoke
    got = {(r["T"], r["pass"]) for r in result["rows"] if r["variant"] == variant}
    reasons = [s["reason"] for s in result["skipped"] if s["variant"] == variant]
    if reasons:
        assert not got and all("torch._grouped_mm" in r for r in reasons), reasons
    else:
        assert got == {(T, p) for T in SMOKE_TOKENS for p in ("fwd", "fwd+bwd")}


@pytest.mark.parametrize("variant", ["liger", "liger-2call", "scattermoe"])
def test_training_anchors_are_skipped_on_a_cpu_with_a_reason(smoke, variant):
    result, stdout = smoke
    assert not [r for r in result["rows"] if r["variant"] == variant]
    skips = [s for s in result["skipped"] if s["variant"] == variant]
    assert {s["pass"] for s in skips} == {"fwd", "fwd+bwd"}
    assert all("GPU" in s["reason"] for s in skips)
    assert f"skipped {variant}/" in stdout


def test_best_plain_training_layer_is_the_fastest_anchor(smoke):
    """best_plain_training names, per (routing, T, pass), the fastest checked row among
    liger / grouped_mm-plain / scattermoe, and grove's fastest backend beside it."""
    from bench.variants import TRAINING_ANCHORS

    result, stdout = smoke
    best = {(b["routing"], b["T"], b["pass"]): b for b in result["best_plain_training"]}
    anchor_rows = [r for r in result["rows"] if r["variant"] in TRAINING_ANCHORS]
    keys = {(r["routing"], r["T"], r["pass"]) for r in anchor_rows}
    assert set(best) == keys
    for key, b in best.items():
        rows = [r for r in anchor_rows if (r["routing"], r["T"], r["pass"]) == key]
        fastest = min(rows, key=lambda r: r["us"])
        assert (b["variant"], b["backend"], b["us"]) == (fastest["variant"], fastest["backend"],
                                                       fastest["us"])
        grove = min((r for r in result["rows"] if r["variant"] == "grove"
                     and (r["routing"], r["T"], r["pass"]) == key), key=lambda r: r["us"])
        assert (b["grove_backend"], b["grove_us"]) == (grove["backend"], grove["us"])
        assert b["grove_vs_best"] == pytest.approx(grove["us"] / fastest["us"], rel=1e-12)
    if keys:
        assert "best plain training layer" in stdout
    assert "anchors" in result["config"]


def _best_row(variant, backend, T, us, check="ok", pass_="fwd+bwd"):
    return {"routing": "uniform", "T": T, "pass": pass_, "variant": variant, "backend": backend,
            "us": us, "check": check, "timing": "graph"}


def test_best_plain_training_skips_wrong_rows_and_other_variants():
    from bench.runner import best_plain_training

    rows = [_best_row("liger", "liger", 64, 50.0, check="MISMATCH"),  # wrong: not a result
            _best_row("grouped_mm-plain", "aten", 64, 80.0),
            _best_row("scattermoe", "scattermoe", 64, 70.0),
            _best_row("grouped_mm-index_add-plain", "aten", 64, 10.0),  # not an anchor
            _best_row("plain", "triton", 64, 5.0),  # ours, not an anchor
            _best_row("grove", "triton", 64, 90.0), _best_row("grove", "cuda", 64, 60.0),
            _best_row("liger", "liger", 8, 30.0)]  # no grove row at T = 8
    best = {b["T"]: b for b in best_plain_training(rows)}
    assert (best[64]["variant"], best[64]["us"]) == ("scattermoe", 70.0)
    assert (best[64]["grove_backend"], best[64]["grove_vs_best"]) == ("cuda", 60.0 / 70.0)
    assert (best[8]["variant"], best[8]["grove_us"], best[8]["grove_vs_best"]) == \
        ("liger", None, None)


def test_partial_results_after_every_row():
    """Config.on_row sees the record after each row, "complete": False, rows growing; the
    CLI writes it to --json so a sweep cut short keeps what it measured."""
    from bench import presets, runner, variants

    seen = []
    cfg = runner.Config(preset=presets.get_preset("tiny"), tokens=(1, 4), routings=("uniform",),
                        backends=("torch",), variants=(variants.VARIANTS_BY_NAME["plain"],),
                        passes=("fwd",), dtype=torch.float32, device=torch.device("cpu"),
                        quick=True, log=None, on_row=seen.append)
    result = runner.run(cfg)
    assert [len(r["rows"]) for r in seen] == [1, 2]
    assert [r["complete"] for r in seen] == [False, False] and result["complete"] is True
    assert seen[-1]["rows"] == result["rows"]


def test_layout_axis(monkeypatch):
    """--layout folded,sections: the Grove layer of gk runs under each adjugate layout (a row
    each, checked against the same reference), other variants once with layout None; the
    caller's GROVE_ADJUGATE_LAYOUT is restored."""
    from bench import cli, runner

    monkeypatch.setenv("GROVE_ADJUGATE_LAYOUT", "sections")
    args = ["--smoke", "--tokens", "3", "--pass", "fwd+bwd", "--variants", "grove,plain",
            "--layout", "folded,sections", "--backends", "torch"]
    parser = cli.build_parser()
    cfg = cli.config_from_args(parser.parse_args(args), parser)
    cfg.log = None
    seen = []
    real_build = runner.var.build

    def build(variant, *a, **kw):
        seen.append((variant.name, os.environ.get("GROVE_ADJUGATE_LAYOUT")))
        return real_build(variant, *a, **kw)

    monkeypatch.setattr(runner.var, "build", build)
    result = runner.run(cfg)
    got = [(r["variant"], r["layout"], r["check"]) for r in result["rows"]]
    assert got == [("grove", "folded", "ok"), ("grove", "sections", "ok"), ("plain", None, "ok")]
    # (the references are built too, under sections)
    assert seen[0] == ("grove", "folded")
    assert set(seen) == {("grove", "folded"), ("grove", "sections"), ("plain", "sections")}
    assert os.environ["GROVE_ADJUGATE_LAYOUT"] == "sections"
    assert result["config"]["layouts"] == ["folded", "sections"]
    with pytest.raises(SystemExit):
        cli.config_from_args(parser.parse_args(["--layout", "diagonal"]), parser)


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


# --- outputs: --results-dir, --plot, the progress bar --------------------------------------

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
BAR = re.compile(r"\d+/\d+ \[[#.]+\] +\d+%")  # what ProgressBar.render draws
# A run with matplotlib blocked: `import matplotlib` raises ImportError, as where it is absent.
NO_MPL = ("import sys; sys.modules['matplotlib'] = None; from bench.cli import main; "
          "sys.exit(main(sys.argv[1:]))")


def _bench(*args, code=None):
    cmd = [sys.executable] + (["-c", code] if code else ["-m", "bench"]) + list(args)
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _png_size(path):
    """(width, height) from the PNG header; fails unless `path` starts like a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == plot.PNG_SIGNATURE, head[:8]
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A small smoke run with --results-dir (a folder it has to create) and, where matplotlib
    is importable, --plot. stderr is a pipe, not a terminal."""
    tmp = tmp_path_factory.mktemp("recorded")
    args = ["--smoke", "--tokens", "1,16", "--variants", "grove,plain",
            "--results-dir", str(tmp / "results")]
    if HAS_MPL:
        args += ["--plot", str(tmp / "fig.png")]
    proc = _bench(*args)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return tmp, proc


def test_results_dir_naming(recorded):
    tmp, proc = recorded
    names = sorted(os.listdir(tmp / "results"))
    jsons = [n for n in names if n.endswith(".json")]
    assert len(jsons) == 1, names
    with open(tmp / "results" / jsons[0]) as f:
        result = json.load(f)
    stem = f"cpu_{result['date'][:10]}"  # device "cpu (arch, n threads)"; the run's UTC date
    assert re.fullmatch(r"cpu_\d{4}-\d{2}-\d{2}", stem)
    assert names == [stem + ".json"] + ([stem + ".png"] if HAS_MPL else [])
    assert {(r["variant"], r["T"]) for r in result["rows"]} == {
        (v, t) for v in ("grove", "plain") for t in (1, 16)}
    if HAS_MPL:
        _png_size(tmp / "results" / (stem + ".png"))
    else:
        assert "python -m bench.plot" in proc.stderr


def test_plot_file_is_a_png(recorded):
    pytest.importorskip("matplotlib")
    tmp, _ = recorded
    width, height = _png_size(tmp / "fig.png")
    assert width > height > 300  # two panels side by side


def test_no_progress_bar_when_stderr_is_not_a_tty(recorded):
    _, proc = recorded
    assert "\r" not in proc.stderr and not BAR.search(proc.stderr)
    assert "grove/torch" in proc.stderr and "wrote " in proc.stderr  # the lines stay


def test_plot_without_matplotlib_fails_before_the_sweep(tmp_path):
    proc = _bench("--smoke", "--plot", str(tmp_path / "f.png"), code=NO_MPL)
    assert proc.returncode == 2, proc.stderr
    assert "--plot" in proc.stderr and "matplotlib" in proc.stderr
    assert "ceilings" not in proc.stderr  # nothing was measured
    assert not (tmp_path / "f.png").exists()


def test_results_dir_without_matplotlib_records_the_json(tmp_path):
    proc = _bench("--smoke", "--tokens", "1", "--variants", "plain", "--pass", "fwd",
                  "--results-dir", str(tmp_path), code=NO_MPL)
    assert proc.returncode == 0, proc.stderr
    names = os.listdir(tmp_path)
    assert len(names) == 1 and re.fullmatch(r"cpu_\d{4}-\d{2}-\d{2}\.json", names[0]), names
    # warned before the sweep (so a GPU user can stop it) and told how to draw it later
    assert proc.stderr.index("matplotlib") < proc.stderr.index("ceilings")
    assert f"python -m bench.plot {tmp_path / names[0]}" in proc.stderr


def test_output_folder_checked_before_the_sweep(tmp_path):
    proc = _bench("--smoke", "--json", str(tmp_path / "missing" / "r.json"))
    assert proc.returncode == 2 and "--json" in proc.stderr and "ceilings" not in proc.stderr


def _bench_on_a_terminal(*args, timeout=300):
    """(exit code, what the run wrote to stderr) with stderr on a pseudo-terminal."""
    pty = pytest.importorskip("pty")  # POSIX only
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=REPO_ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end of the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, b"".join(chunks).decode("utf-8", errors="replace")


TERMINAL_RUN = ("--smoke", "--tokens", "1", "--variants", "grove,plain", "--pass", "fwd")


def test_progress_bar_drawn_on_a_terminal():
    rc, err = _bench_on_a_terminal(*TERMINAL_RUN)
    assert rc == 0, err
    assert BAR.search(err) and "1/2 [" in err, err
    assert "plain/torch" in err  # the row lines still go out, above the bar


def test_quiet_draws_nothing_on_a_terminal():
    rc, err = _bench_on_a_terminal(*TERMINAL_RUN, "--quiet")
    assert rc == 0, err
    assert not BAR.search(err) and "plain/torch" not in err and "ceilings" not in err, err


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _screen(text):
    """The lines a terminal shows after `text`: `\\r` returns to column 0, `\\n` ends a line."""
    lines, cur, col = [], [], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur))
            cur, col = [], 0
        else:
            cur[col:col + 1] = [ch]
            col += 1
    return [line.rstrip() for line in lines + ["".join(cur)]]


def _drive(bar, rows):
    for i in range(rows):
        bar.step(f"cell {i}")
        bar.write(f"row {i}")
    bar.close()


def test_progress_bar_writes_plain_lines_off_a_terminal():
    out = io.StringIO()
    _drive(progress.ProgressBar(3, out), 3)
    assert out.getvalue() == "row 0\nrow 1\nrow 2\n"
    tty = _Tty()
    _drive(progress.ProgressBar(3, tty, enabled=False), 3)  # the CLI's --quiet is stream None
    assert tty.getvalue() == "row 0\nrow 1\nrow 2\n"
    _drive(progress.ProgressBar(3, None), 3)  # silent, and no error


def test_progress_bar_on_a_terminal_leaves_clean_lines():
    tty = _Tty()
    _drive(progress.ProgressBar(3, tty), 3)
    assert "\r" in tty.getvalue() and BAR.search(tty.getvalue())
    # the long bar never bleeds into the short row lines, and close() erases it
    assert _screen(tty.getvalue()) == ["row 0", "row 1", "row 2", ""]


def test_progress_bar_render():
    now = [100.0]
    bar = progress.ProgressBar(4, _Tty(), width=8, clock=lambda: now[0])
    bar.step("first")
    assert bar.render() == "0/4 [........]   0% 0:00  first"
    now[0] += 65
    bar.step("second")
    assert bar.render() == "1/4 [##......]  25% 1:05  second"
    bar.step("x" * 300)  # a StringIO has no terminal size: 80 columns, the bar one less
    assert len(bar.render()) == 79
    assert progress.format_elapsed(3725) == "1:02:05"


def _row(variant, backend, pass_, routing, T, us, pct):
    return {"variant": variant, "backend": backend, "pass": pass_, "routing": routing, "T": T,
            "us": us, "pct_floor": pct}


PLOT_ROWS = [
    _row("grove", "torch", "fwd", "uniform", 64, 40.0, 30.0),
    _row("plain", "torch", "fwd", "uniform", 64, 30.0, 35.0),
    _row("grove", "torch", "fwd", "uniform", 1, 10.0, 2.0),
    _row("grove", "torch", "fwd+bwd", "uniform", 1, 25.0, 1.5),
    _row("grove", "triton", "fwd", "skewed", 1, 5.0, 4.0),
]
PLOT_RESULT = {"device": "cpu (test)", "torch": "0", "commit": None,
               "date": "2026-11-23T00:00:00+00:00", "rows": PLOT_ROWS,
               "ceilings": {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0},
               "config": {"preset": {"name": "tiny"}, "dtype": "float32"}}


def test_plot_series_one_per_variant_backend_pass_routing():
    s = plot.series(PLOT_ROWS)
    assert list(s) == [("grove", "torch", "fwd", "uniform"), ("plain", "torch", "fwd", "uniform"),
                       ("grove", "torch", "fwd+bwd", "uniform"),
                       ("grove", "triton", "fwd", "skewed")]
    assert s[("grove", "torch", "fwd", "uniform")] == [(1, 10.0, 2.0), (64, 40.0, 30.0)]


def test_plot_figure_has_a_line_per_series():
    pytest.importorskip("matplotlib")
    fig = plot.build_figure(PLOT_RESULT)
    ax_us, ax_pct = fig.axes
    assert (ax_us.get_xscale(), ax_us.get_yscale()) == ("log", "log")
    assert (ax_pct.get_xscale(), ax_pct.get_yscale()) == ("log", "linear")
    want = {f"{v}/{b} {p} {r}" for v, b, p, r in plot.series(PLOT_ROWS)}
    for ax, ys in ((ax_us, [10.0, 40.0]), (ax_pct, [2.0, 30.0])):  # T = 1, 64 of PLOT_ROWS
        assert {line.get_label() for line in ax.get_lines()} == want
        line = next(ln for ln in ax.get_lines() if ln.get_label() == "grove/torch fwd uniform")
        assert list(line.get_xdata()) == [1, 64]
        assert list(line.get_ydata()) == ys


def test_plot_cli_redraws_a_saved_run(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "run.json"
    report.write_json(PLOT_RESULT, src)
    assert plot.main([str(src)]) == 0
    _png_size(tmp_path / "run.png")
    empty = dict(PLOT_RESULT, rows=[])  # every variant skipped: a figure that says so
    report.write_json(empty, src)
    assert plot.main([str(src), str(tmp_path / "empty.png")]) == 0
    _png_size(tmp_path / "empty.png")


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm4"),
    ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
    ("cpu (x86_64, 2 threads)", "cpu"),
])
def test_device_slug(name, slug):
    assert report.device_slug(name) == slug


def test_results_paths_use_the_run_date_and_never_overwrite(tmp_path):
    result = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23T23:59:59+00:00"}
    base = str(tmp_path / "h100_2026-11-23")
    assert report.results_paths(result, tmp_path) == (base + ".json", base + ".png")
    (tmp_path / "h100_2026-11-23.png").write_bytes(b"")  # either file of the pair is taken
    assert report.results_paths(result, tmp_path) == (base + "_2.json", base + "_2.png")
    (tmp_path / "h100_2026-11-23_2.json").write_text("{}")
    assert report.results_paths(result, tmp_path)[0] == base + "_3.json"
