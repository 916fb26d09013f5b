"""Build script for grove-kernels.

The Python packages install everywhere. The CUDA extension `grove_kernels._C` is built from
csrc/ only where a CUDA toolkit AND a CUDA build of torch are present:

    GROVE_BUILD_CUDA=auto  (default) build when nvcc and torch.version.cuda are both found
    GROVE_BUILD_CUDA=0     never build it
    GROVE_BUILD_CUDA=1     build it or fail loudly

The target is fixed (sm_90a) and no GPU is ever queried at build time, so the same command
works on a build box without a GPU.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_FLAGS = [
    "-O3",
    "-std=c++17",
    "-DNDEBUG",  # without it ptxas serializes wgmma (DESIGN §4)
    "--expt-relaxed-constexpr",
    "-gencode=arch=compute_90a,code=sm_90a",
]


def _cuda_sources():
    return sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)) + sorted(
        glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    )


def _cuda_extension():
    mode = os.environ.get("GROVE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"GROVE_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return []
    sources = _cuda_sources()
    reasons = []
    if not sources:
        reasons.append("csrc/ has no .cu/.cpp sources yet")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError as exc:  # pragma: no cover - torch is a prerequisite
        raise SystemExit(f"torch must be installed before grove-kernels: {exc}")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        reasons.append("no CUDA toolkit (nvcc) found")
    if torch.version.cuda is None:
        reasons.append("torch is a CPU build")
    if reasons:
        if mode == "1":
            raise SystemExit("GROVE_BUILD_CUDA=1 but the extension cannot be built: " + "; ".join(reasons))
        print("grove-kernels: skipping grove_kernels._C (" + "; ".join(reasons) + ")")
        return []
    return [
        CUDAExtension(
            "grove_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": CUDA_FLAGS},
        )
    ]


def _cmdclass(ext_modules):
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules = _cuda_extension()
setup(
    name="grove-kernels",
    version="0.1.0",
    description="Fused Grove MoE (experts + adjugate experts) kernels for PyTorch",
    packages=find_packages(include=["grove_kernels", "grove_kernels.*"])
    + find_packages("python", include=["grove_model", "grove_model.*"]),
    package_dir={"grove_model": "python/grove_model"},
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=_cmdclass(ext_modules),
)
