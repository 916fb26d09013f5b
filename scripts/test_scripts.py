"""scripts/demo.sh and scripts/test.sh (through scripts/setup.sh) with a stand-in Python that
records what they would install, build and run: nothing is installed (the install stamp goes
to the test's tmp_path).

    fake python: `-m pip ...` logs the call with its GROVE_BUILD_CUDA; `csrc/build_cuda.py`
                 logs "build_cuda" (exit FAKE_BUILD_RC); other `-m X` log "run X"; `-c CODE`
                 answers the scripts' probes: a CUDA GPU per FAKE_GPU, nvcc + CUTLASS present
                 unless FAKE_NO_NVCC, modules in FAKE_MISSING not importable, grove_kernels
                 imported from FAKE_HERE

Expected: the demo builds the CUDA extension only with a GPU; test.sh builds it wherever nvcc
and CUTLASS are (CI checks its SASS), whatever an earlier demo installed; the objects compile
outside pip (their progress shows), pip runs without -q, and each step prints a line.
"""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = r"""#!/usr/bin/env bash
log=$FAKE_LOG
if [ "$1" = -m ] && [ "$2" = pip ]; then
  echo "pip GROVE_BUILD_CUDA=${GROVE_BUILD_CUDA-unset} ${*:3}" >> "$log"; exit 0
fi
if [ "$1" = csrc/build_cuda.py ]; then echo "build_cuda" >> "$log"; exit "${FAKE_BUILD_RC:-0}"; fi
if [ "$1" = -m ]; then echo "run ${*:2}" >> "$log"; exit 0; fi
if [ "$1" = -c ]; then
  case "$2" in
    *cuda.is_available*) [ "${FAKE_GPU:-0}" = 1 ]; exit ;;
    *missing_prerequisites*) [ -z "${FAKE_NO_NVCC:-}" ]; exit ;;
    *grove_kernels.__file__*) echo "${FAKE_HERE:-/elsewhere/grove_kernels}"; exit 0 ;;
    *sys.executable*) echo /fake/python; exit 0 ;;
    *sched_getaffinity*) echo 2; exit 0 ;;
  esac
  for mod in ${FAKE_MISSING:-}; do
    case "$2" in *"import $mod"*) exit 1 ;; esac
  done
  exit 0
fi
echo "unexpected call: $*" >> "$log"; exit 3
"""


HERE = os.path.join(ROOT, "grove_kernels")


def run(tmp_path, script, *args, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log"
    log.write_text("")
    full = {k: v for k, v in os.environ.items() if k != "GROVE_BUILD_CUDA"}
    full.update(PYTHON=str(fake), FAKE_LOG=str(log),
                GROVE_INSTALL_STAMP=str(tmp_path / "install.stamp"), **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], env=full,
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert not any(c.startswith("unexpected") for c in calls), calls
    return proc, calls


def editable_install(calls):
    """The last editable install (test.sh with a background build makes two: without the
    extension for the interpreter tier, then with it)."""
    pips = [c for c in calls if c.startswith("pip") and c.endswith("-e .")]
    assert pips, calls
    return pips[-1]


def test_demo_without_gpu_builds_no_cuda(tmp_path):
    proc, calls = run(tmp_path, "demo.sh", FAKE_GPU="0")
    assert proc.returncode == 0, proc.stderr
    assert editable_install(calls).startswith("pip GROVE_BUILD_CUDA=0 ")
    assert "build_cuda" not in calls
    assert not any("nvidia-cutlass" in c for c in calls)
    assert calls[-2:] == ["run grove_kernels.selfcheck",
                          "run bench --preset small --tokens 1,16,64 --pass both"]


def test_demo_with_gpu_builds_cuda(tmp_path):
    proc, calls = run(tmp_path, "demo.sh", FAKE_GPU="1")
    assert proc.returncode == 0, proc.stderr
    assert calls.index("build_cuda") < calls.index(editable_install(calls))
    assert editable_install(calls).startswith("pip GROVE_BUILD_CUDA=auto ")


@pytest.mark.parametrize("gpu", ["0", "1"])
def test_test_sh_builds_cuda_wherever_nvcc_is(tmp_path, gpu):
    # An earlier demo without the extension (GROVE_BUILD_CUDA=0, no GPU) is not what test.sh
    # wants: it reinstalls with its own choice. A demo on a GPU built what test.sh would.
    run(tmp_path, "demo.sh", FAKE_GPU=gpu, FAKE_HERE=HERE)
    proc, calls = run(tmp_path, "test.sh", FAKE_GPU=gpu, FAKE_HERE=HERE)
    assert proc.returncode == 0, proc.stderr
    xdist = "-n 2 --dist worksteal"
    tiers = ["run pytest -q -ra -m interpreter " + xdist + " tests",
             "run pytest -q -ra -m unit or toolchain or e2e or gpu -n 2 --dist loadgroup tests",
             "run pytest -q -ra -n 2 --dist loadgroup bench scripts --benchmark-disable"]
    if gpu == "0":
        # nvcc in the background: the interpreter tier runs on an install without the
        # extension, the other tiers after it is installed.
        assert calls.index("build_cuda") < calls.index(editable_install(calls))
        installs = [c for c in calls if c.startswith("pip") and c.endswith("-e .")]
        assert [c.split()[1] for c in installs] == ["GROVE_BUILD_CUDA=0", "GROVE_BUILD_CUDA=auto"]
        assert calls.index(installs[0]) < calls.index(tiers[0]) < calls.index(installs[1]) \
            < calls.index(tiers[1])
        assert "background" in proc.stdout
    else:
        assert "already installed" in proc.stdout and "build_cuda" not in calls
    assert [c for c in calls if c.startswith("run pytest")] == tiers
    # Each tier's wall time, then all of them on one line.
    for name in ("interpreter", "unit+toolchain+e2e+gpu", "bench+scripts"):
        assert f"[test] {name}: " in proc.stdout
    assert "[test] wall time: setup " in proc.stdout.splitlines()[-1]


def test_nothing_is_reinstalled_when_nothing_changed(tmp_path):
    proc, calls = run(tmp_path, "test.sh", FAKE_HERE=HERE)
    assert proc.returncode == 0 and any(c.endswith("-e .") for c in calls)
    proc, calls = run(tmp_path, "test.sh", FAKE_HERE=HERE)
    assert proc.returncode == 0, proc.stderr
    assert "build_cuda" not in calls and not any(c.endswith("-e .") for c in calls)
    assert "already installed" in proc.stdout
    # The package imported from elsewhere (another checkout): reinstall.
    proc, calls = run(tmp_path, "test.sh")
    assert any(c.endswith("-e .") for c in calls)


def test_quick_runs_the_unit_tier_on_the_last_install(tmp_path):
    run(tmp_path, "test.sh", FAKE_HERE=HERE)  # with the extension (auto)
    proc, calls = run(tmp_path, "test.sh", "--quick", FAKE_HERE=HERE)
    assert proc.returncode == 0, proc.stderr
    assert not any(c.endswith("-e .") for c in calls)
    assert [c for c in calls if c.startswith("run pytest")] == [
        "run pytest -q -ra -m unit -n 2 --dist worksteal tests"]


def test_quick_first_install_has_no_extension(tmp_path):
    proc, calls = run(tmp_path, "test.sh", "--quick", FAKE_HERE=HERE)
    assert proc.returncode == 0, proc.stderr
    assert "build_cuda" not in calls
    assert editable_install(calls).startswith("pip GROVE_BUILD_CUDA=0 ")


def test_without_nvcc_nothing_is_compiled(tmp_path):
    proc, calls = run(tmp_path, "test.sh", FAKE_NO_NVCC="1")
    assert proc.returncode == 0, proc.stderr
    assert "build_cuda" not in calls
    assert editable_install(calls).startswith("pip GROVE_BUILD_CUDA=auto ")


def test_failed_cuda_build(tmp_path):
    """auto: reported, then installed without the extension (test_cuda_build.py will fail on
    it); GROVE_BUILD_CUDA=1: fatal."""
    proc, calls = run(tmp_path, "test.sh", FAKE_BUILD_RC="1")
    assert proc.returncode == 0 and "failed to compile" in proc.stderr
    assert editable_install(calls).startswith("pip GROVE_BUILD_CUDA=0 ")
    proc, calls = run(tmp_path, "test.sh", FAKE_BUILD_RC="1", GROVE_BUILD_CUDA="1")
    assert proc.returncode != 0
    assert not any(c.endswith("-e .") for c in calls)


@pytest.mark.parametrize("gpu", ["0", "1"])
def test_user_choice_overrides(tmp_path, gpu):
    proc, calls = run(tmp_path, "test.sh", GROVE_BUILD_CUDA="0", FAKE_GPU=gpu)
    assert proc.returncode == 0, proc.stderr
    assert "build_cuda" not in calls
    assert editable_install(calls).startswith("pip GROVE_BUILD_CUDA=0 ")


def test_fresh_machine_shows_progress(tmp_path):
    proc, calls = run(tmp_path, "demo.sh", FAKE_MISSING="torch triton pytest_benchmark")
    assert proc.returncode == 0, proc.stderr
    pips = [c for c in calls if c.startswith("pip")]
    assert any(c.endswith("install --disable-pip-version-check torch==2.13.0") for c in pips)
    assert any("triton==3.6.0" in c and "pytest-benchmark" in c for c in pips)
    # pip's progress (downloads, build steps) is what shows during the long steps.
    assert not any(" -q" in c for c in pips), pips
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[setup")]
    assert len(steps) >= 4 and "installing torch" in steps[0] and steps[-1].endswith("ready")


def test_only_test_sh_installs_the_transformers_extra(tmp_path):
    proc, calls = run(tmp_path, "test.sh", FAKE_MISSING="transformers")
    assert proc.returncode == 0, proc.stderr
    assert any("transformers>=5,<6" in c and "accelerate" in c for c in calls), calls
    proc, calls = run(tmp_path, "demo.sh", FAKE_MISSING="transformers")
    assert proc.returncode == 0, proc.stderr
    assert not any("transformers" in c for c in calls), calls


# scripts/gpu_check.sh: the one GPU run. Checked here without a GPU: its syntax, its stage
# list and budgets (--dry-run), that a stage that hangs is cut at its own limit while the
# stages after it still run, and the summary table it prints last.
GPU_CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")
GPU_STAGES = ["build", "selfcheck", "tests", "cuda", "sanitize", "bench", "settings", "kernels",
              "coactive", "summary"]


def test_gpu_check_syntax():
    proc = subprocess.run(["bash", "-n", GPU_CHECK], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_dry_run_lists_the_stages(tmp_path):
    proc = subprocess.run(["bash", GPU_CHECK, "--dry-run", str(tmp_path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    stages = [line.split()[1] for line in lines if line.startswith("stage ")]
    assert stages == GPU_STAGES
    budgets = [int(line.split()[2].rstrip("s")) for line in lines
               if line.startswith("stage ") and "optional" not in line]
    total = int(lines[0].split("total budget ")[1].split("s")[0])
    assert sum(budgets) <= total <= 8 * 60  # the script fits 8 minutes of a 15-minute lease
    text = proc.stdout
    assert "--pass both --layout folded,sections" in text
    assert "--tokens 16384,4096,1024,256,64,1" in text and "--routing coactive" in text
    assert "compute-sanitizer --tool memcheck" in text
    assert "env GROVE_CUDA_FUSE_SWIGLU=1" in text.split("stage settings")[1]
    for layout in ("sections", "folded"):
        assert layout in text.split("stage selfcheck")[1].split("stage tests")[0]
    outside = ("/".join(("..", "shared")), "/work/")  # spelled so the repository never names it
    assert not any(p in text for p in outside), "paths outside the repository"
    assert not os.listdir(tmp_path), "a dry run writes nothing"


FAKE_GPU_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *"-m pytest"*) sleep 60 ;;
  *gpu_summary.py*) echo "SUMMARY TABLE" ;;
esac
exit 0
"""


def test_gpu_check_a_hanging_stage_is_cut_and_the_summary_comes_last(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_GPU_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(tmp_path / "log"),
               GPU_CHECK_BUDGET_S="24")
    proc = subprocess.run(["bash", GPU_CHECK, "--stages", "tests,summary", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status = (out / "stages.txt").read_text().split("\n")
    assert status[0].startswith("tests TIMEOUT"), status
    assert status[1].startswith("summary ok"), status
    assert proc.stdout.rstrip().endswith("SUMMARY TABLE")
    assert "-m gpu tests" in (tmp_path / "log").read_text()


def test_gpu_summary_table(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "gpu_summary", os.path.join(ROOT, "scripts", "gpu_summary.py"))
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)

    def row(variant, backend, us, pass_="fwd", layout=None, check="ok"):
        r = dict(routing="uniform", T=4096, variant=variant, backend=backend, us=us,
                 check=check, **{"pass": pass_})
        if layout:
            r["layout"] = layout
        return r

    rows = [row("vllm", "vllm", 800.0), row("plain", "cuda", 750.0),
            row("grove", "cuda", 1000.0, layout="sections"),
            row("grove", "cuda", 700.0, layout="folded"),
            row("grove", "cuda", 2800.0, "fwd+bwd", "folded"),
            row("grove", "triton", 1300.0, check="MISMATCH")]  # no layout field: sections
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows, "complete": False}))
    text = summary.table(summary.load([str(path)]))
    cuda = [line for line in text.splitlines() if " cuda " in line][0].split()
    assert cuda[:7] == ["uniform", "4096", "cuda", "800", "750", "1000", "700"]
    assert cuda[7:10] == ["0.70", "0.93", "0.88"]  # folded / sections, / plain, / vLLM
    assert cuda[-1] == "4.00"  # fwd+bwd / fwd of the folded layout
    triton = [line for line in text.splitlines() if " triton " in line][0]
    assert "1300!" in triton
    # A bench without the layout axis: one file per layout, the layout in the file's name.
    folded = tmp_path / "bench_uniform_1_folded.json"
    folded.write_text(json.dumps({"rows": [row("grove", "triton", 650.0)]}))
    text = summary.table(summary.load([str(path), str(folded)]))
    triton = [line for line in text.splitlines() if " triton " in line][0].split()
    assert triton[5:7] == ["1300!", "650"]
    # A run under another setting: its backends carry the setting, its vLLM rows are dropped.
    fused = tmp_path / "bench_uniform@fused.json"
    fused.write_text(json.dumps({"rows": [row("vllm", "vllm", 1.0),
                                          row("grove", "cuda", 600.0, layout="folded")]}))
    text = summary.table(summary.load([str(path), str(fused)]))
    line = [ln for ln in text.splitlines() if " cuda@fused " in ln][0].split()
    assert line[2:4] == ["cuda@fused", "800"] and line[6] == "600"  # vLLM from the main run
