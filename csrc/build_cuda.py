"""Compile the torch-free CUDA sources of csrc/ into cached objects (used by setup.py and tests).

    python csrc/build_cuda.py [--build-dir DIR] [--jobs N] [--check-sass]

Every csrc/**/*.cu is compiled by nvcc for sm_90a only (docs/design.md §4: without the `a` a
CUTLASS sm90 kernel compiles into one that only prints an error; without -DNDEBUG ptxas serialises
wgmma). Objects are cached under build/grove_cuda/ keyed by a hash of the source, every header
of csrc/, the flags, nvcc and the CUTLASS headers, so a rebuild (or the test suite) recompiles
only what changed. No GPU is queried. Jobs run in parallel, bounded by the cores and by memory
(a CUTLASS grouped-GEMM unit needs about 3.5 GB and a minute).
"""
import argparse
import concurrent.futures
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time

CSRC = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CSRC)
DEFAULT_BUILD_DIR = os.path.join(ROOT, "build", "grove_cuda")
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",  # without it ptxas serialises wgmma
    "-gencode=arch=compute_90a,code=sm_90a",  # the `a` is required for wgmma/TMA (HGMMA)
    "--expt-relaxed-constexpr",
    "-Xcompiler",
    "-fPIC",
]
GB_PER_JOB = 4.0  # peak ~3.5 GB per CUTLASS unit


def cu_sources():
    """All .cu files of csrc/, sorted, as paths."""
    return sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))


def headers():
    return sorted(
        glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True)
        + glob.glob(os.path.join(CSRC, "**", "*.cuh"), recursive=True)
    )


def find_nvcc():
    """Path of nvcc, or None."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _toolkit_roots(nvcc):
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # /usr/local/bin/nvcc may be a wrapper script: ask nvcc where its toolkit is.
        try:
            out = subprocess.run([nvcc, "-dryrun", "--version"], capture_output=True, text=True,
                                 timeout=60).stderr
            for line in out.splitlines():
                if "TOP=" in line:
                    roots.append(os.path.normpath(line.split("TOP=", 1)[1].strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    roots += ["/usr/local/cuda"]
    return [r for r in roots if r]


def cudart_dir(nvcc=None):
    """Directory holding libcudart.so of the toolkit that owns nvcc, or None."""
    for root in _toolkit_roots(nvcc or find_nvcc()):
        for sub in ("lib64", os.path.join("targets", "x86_64-linux", "lib"), "lib"):
            d = os.path.join(root, sub)
            if os.path.exists(os.path.join(d, "libcudart.so")):
                return os.path.realpath(d)
    return None


def find_cuobjdump(nvcc=None):
    """cuobjdump from the toolkit, else the copy shipped in Triton's package, or None."""
    nvcc = nvcc or find_nvcc()
    candidates = [os.path.join(r, "bin", "cuobjdump") for r in _toolkit_roots(nvcc)]
    candidates.append(shutil.which("cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "backends", "nvidia", "bin", "cuobjdump"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cutlass_include_dirs():
    """[include, tools/util/include] of the nvidia-cutlass wheel (cutlass_library), or None."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        src = os.path.join(loc, "source")
        dirs = [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]
        if os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h")):
            return dirs
    return None


def missing_prerequisites():
    """Reasons the objects cannot be built here (empty when they can)."""
    reasons = []
    if not cu_sources():
        reasons.append("csrc/ has no .cu sources")
    if find_nvcc() is None:
        reasons.append("no CUDA toolkit (nvcc) found")
    if cutlass_include_dirs() is None:
        reasons.append("CUTLASS headers not found (pip install --no-deps nvidia-cutlass==4.2.0.0)")
    return reasons


def _nvcc_version(nvcc):
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout


def _default_jobs(n):
    cores = os.cpu_count() or 1
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        avail = 8.0
    return max(1, min(n, cores, int(avail // GB_PER_JOB)))


def object_path(src, build_dir):
    rel = os.path.relpath(src, CSRC)
    return os.path.join(build_dir, rel[: -len(".cu")].replace(os.sep, "__") + ".o")


def compile_objects(build_dir=DEFAULT_BUILD_DIR, jobs=None, log=print):
    """Compile every csrc .cu (cache hits skipped); return {source: object path}.

    Raises RuntimeError naming the failing sources with the tail of nvcc's output.
    """
    reasons = missing_prerequisites()
    if reasons:
        raise RuntimeError("cannot build the CUDA objects: " + "; ".join(reasons))
    nvcc = find_nvcc()
    includes = [os.path.join(CSRC, "include"), os.path.join(CSRC, "gemm")] + cutlass_include_dirs()
    flags = NVCC_FLAGS + [f"-I{d}" for d in includes]
    # The key is location-free (no include paths, no nvcc path, headers by relative name), so
    # objects built on one machine are reused on another with the same nvcc and CUTLASS (a GPU
    # machine without a compiler cache starts from objects built elsewhere).
    common = hashlib.sha256()
    common.update(repr((NVCC_FLAGS, _nvcc_version(nvcc))).encode())
    for h in headers():
        with open(h, "rb") as f:
            common.update(os.path.relpath(h, CSRC).encode() + f.read())
    cutlass_h = os.path.join(cutlass_include_dirs()[0], "cutlass", "version.h")
    if os.path.exists(cutlass_h):
        with open(cutlass_h, "rb") as f:
            common.update(f.read())
    os.makedirs(build_dir, exist_ok=True)

    todo, objects = [], {}
    for src in cu_sources():
        obj = object_path(src, build_dir)
        h = common.copy()
        with open(src, "rb") as f:
            h.update(f.read())
        key = h.hexdigest()
        objects[src] = obj
        try:
            with open(obj + ".key") as f:
                cached = f.read().strip() == key and os.path.exists(obj)
        except OSError:
            cached = False
        if not cached:
            todo.append((src, obj, key))
    if not todo:
        log(f"grove-kernels: {len(objects)} CUDA objects up to date in {build_dir}")
        return objects

    jobs = jobs or int(os.environ.get("GROVE_CUDA_JOBS", 0)) or _default_jobs(len(todo))
    log(f"grove-kernels: compiling {len(todo)} CUDA source(s) for sm_90a with {jobs} job(s)")

    def build(item):
        src, obj, key = item
        t0 = time.time()
        cmd = [nvcc] + flags + ["-c", src, "-o", obj + ".tmp"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return src, time.time() - t0, (proc.stdout + proc.stderr)[-4000:] or "nvcc failed"
        os.replace(obj + ".tmp", obj)
        with open(obj + ".key", "w") as f:
            f.write(key)
        return src, time.time() - t0, None

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for src, seconds, error in pool.map(build, todo):
            rel = os.path.relpath(src, ROOT)
            log(f"grove-kernels:   {rel}: {'FAILED' if error else 'ok'} ({seconds:.0f} s)")
            if error:
                failures.append(f"{rel}:\n{error}")
    if failures:
        raise RuntimeError("nvcc failed on:\n" + "\n".join(failures))
    return objects


def count_hgmma(obj, cuobjdump=None):
    """Number of SASS lines with an HGMMA (wgmma) instruction in an object file."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton/backends/nvidia/bin)")
    proc = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True)
    return sum("HGMMA" in line for line in proc.stdout.splitlines())


def resource_usage(obj, cuobjdump=None):
    """[(function, registers, stack bytes, local bytes)] of every kernel in an object file
    (cuobjdump -res-usage). A register spill shows as stack / local memory."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton/backends/nvidia/bin)")
    out = subprocess.run([cuobjdump, "-res-usage", obj], capture_output=True, text=True,
                         check=True).stdout
    usage, function = [], None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and function is not None:
            fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
            usage.append((function, int(fields["REG"]), int(fields["STACK"]),
                          int(fields["LOCAL"])))
            function = None
    return usage


def is_gemm_source(src):
    """True for a grouped-GEMM kernel (csrc/gemm/instantiations/, from generate_kernels.py)."""
    return os.path.relpath(src, CSRC).startswith(os.path.join("gemm", "instantiations") + os.sep)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default=DEFAULT_BUILD_DIR)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--check-sass", action="store_true",
                        help="fail unless every GEMM kernel object's SASS contains HGMMA and "
                             "no kernel uses stack or local memory (spills)")
    args = parser.parse_args(argv)
    t0 = time.time()
    objects = compile_objects(args.build_dir, args.jobs)
    print(f"grove-kernels: objects ready in {time.time() - t0:.0f} s")
    if args.check_sass:
        bad = []
        for src, obj in objects.items():
            usage = resource_usage(obj)
            regs = sorted({r for _, r, _, _ in usage})
            spills = [f for f, _, stack, local in usage if stack or local]
            hgmma = count_hgmma(obj) if is_gemm_source(src) else None
            print(f"{os.path.relpath(obj, ROOT)}: {len(usage)} kernels, registers {regs}, "
                  f"{len(spills)} with stack/local memory"
                  + ("" if hgmma is None else f", {hgmma} HGMMA"))
            if spills or hgmma == 0:
                bad.append(src)
        if bad:
            print("no HGMMA, or spills, in: " + ", ".join(bad), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
