"""`pip wheel .` builds a wheel that carries the package and its data files (the Triton tile
table, auto's per-device tables) and installs into a fresh virtual environment, where the
package imports from the wheel, not from this checkout. Built without the CUDA extension
(GROVE_BUILD_CUDA=0) to stay fast; the extension's own build is tests/test_cuda_build.py."""
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["grove_kernels/triton/configs.json"]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, GROVE_BUILD_CUDA="0")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", str(out), ROOT], env=env)
    (path,) = out.glob("grove_kernels-*.whl")
    return path


def test_wheel_carries_the_package_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("grove_kernels/__init__.py", "grove_kernels/backends.py",
                   "grove_kernels/triton/gemm_m_grouped.py", "grove_kernels/cuda/backend.py",
                   "grove_model/modeling.py"):
        assert module in names
    tables = os.path.join(ROOT, "grove_kernels", "auto_tables")
    for data in DATA + [f"grove_kernels/auto_tables/{f}" for f in sorted(os.listdir(tables))
                        if f.endswith(".json")]:
        assert data in names, f"{data} is not in the wheel"
    assert not any(n.startswith(("tests/", "bench/", "csrc/")) for n in names)


def test_wheel_installs_and_imports_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    # torch comes from this interpreter's site-packages (a venv's own, when the tests run in
    # one), appended after the new venv's: the wheel's copy of grove_kernels wins.
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(purelib.strip(), "outer.pth"), "w") as f:
        f.write(torch_site + "\n" + sysconfig.get_paths()["purelib"] + "\n")
    # --target: the new venv's site-packages, whatever the outer environment has installed.
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
          "--disable-pip-version-check", "--target", purelib.strip(), str(wheel)])
    code = ("import os, grove_kernels as gk, torch; from grove_kernels.triton import config; "
            "print(os.path.dirname(gk.__file__)); print(os.path.exists(config._PATH)); "
            "x = torch.randn(3, 8); w1 = torch.randn(4, 6, 8); w2 = torch.randn(4, 8, 3); "
            "w, ids, _ = gk.fused_topk(x, torch.randn(3, 4), 2, True); "
            "print(tuple(gk.fused_experts(x, w1, w2, w, ids).shape))")
    out = _run([str(py), "-c", code], cwd=str(tmp_path),
               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).split("\n")
    assert out[0].startswith(str(venv)), f"grove_kernels imported from {out[0]}, not the wheel"
    assert out[1] == "True" and out[2] == "(3, 8)"

