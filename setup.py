"""Build script for grove-kernels.

The Python packages install everywhere. The CUDA extension `grove_kernels._C` (csrc/) is built
where a CUDA toolkit (nvcc) and the CUTLASS headers (pip install --no-deps
nvidia-cutlass==4.2.0.0) are found, with a CUDA torch or a CPU one alike:

    GROVE_BUILD_CUDA=auto  (default) build when nvcc and the CUTLASS headers are found; a failed
                           build is reported and skipped (tests/test_cuda_build.py then fails)
    GROVE_BUILD_CUDA=0     never build it
    GROVE_BUILD_CUDA=1     build it or fail loudly

How (docs/design.md §4): every csrc/**/*.cu is torch-free and compiled by nvcc for sm_90a into
objects cached under build/grove_cuda/ (csrc/build_cuda.py; parallel, bounded by cores and memory);
csrc/bindings*.cpp are compiled by g++ as a torch CppExtension and linked with those objects and
cudart (rpath to the toolkit), never against libtorch_cuda, so the extension also links and
imports under the CPU torch wheel. The target is fixed (sm_90a) and no GPU is ever queried at
build time. GROVE_CUDA_JOBS=N overrides the number of parallel nvcc jobs.
"""
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import build_cuda  # noqa: E402  (csrc/build_cuda.py)

sys.path.pop(0)


def _build_mode():
    mode = os.environ.get("GROVE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"GROVE_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _cuda_extension():
    mode = _build_mode()
    if mode == "0":
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as exc:  # pragma: no cover - torch is a prerequisite
        raise SystemExit(f"torch must be installed before grove-kernels: {exc}")
    reasons = build_cuda.missing_prerequisites()
    lib_dir = build_cuda.cudart_dir() if not reasons else None
    if not reasons and lib_dir is None:
        reasons.append("libcudart.so not found next to nvcc")
    if reasons:
        if mode == "1":
            raise SystemExit("GROVE_BUILD_CUDA=1 but the extension cannot be built: " + "; ".join(reasons))
        print("grove-kernels: skipping grove_kernels._C (" + "; ".join(reasons) + ")")
        return []
    return [
        CppExtension(
            "grove_kernels._C",
            [os.path.join("csrc", "bindings.cpp"), os.path.join("csrc", "bindings_rows.cpp")],
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            extra_compile_args={"cxx": ["-O2"]},
            library_dirs=[lib_dir],
            libraries=["cudart"],
            extra_link_args=[f"-Wl,-rpath,{lib_dir}"],
        )
    ]


def _cmdclass(ext_modules):
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithCudaObjects(BuildExtension):
        """Compiles the csrc .cu objects (cached) first, then builds and links bindings*.cpp."""

        def build_extensions(self):
            try:
                objects = list(build_cuda.compile_objects().values())
            except RuntimeError as exc:
                if _build_mode() == "1":
                    raise
                print(f"grove-kernels: WARNING: skipping grove_kernels._C, CUDA build failed: {exc}")
                self.extensions = []
                return
            for ext in self.extensions:
                ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extensions()

    return {"build_ext": BuildWithCudaObjects.with_options(use_ninja=True)}


ext_modules = _cuda_extension()
setup(
    name="grove-kernels",
    version="0.1.0",
    description="Fused Grove MoE (experts + adjugate experts) kernels for PyTorch",
    packages=find_packages(include=["grove_kernels", "grove_kernels.*"])
    + find_packages("python", include=["grove_model", "grove_model.*"]),
    package_dir={"grove_model": "python/grove_model"},
    # Measured tables: Triton tile configurations, auto's backend choices per device.
    package_data={"grove_kernels": ["triton/configs.json", "auto_tables/*.json"]},
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors"],
    # transformers: grove_kernels.integrations.transformers (the Trainer also needs accelerate)
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"],
                    "transformers": ["transformers>=5,<6"]},
    ext_modules=ext_modules,
    cmdclass=_cmdclass(ext_modules),
)
