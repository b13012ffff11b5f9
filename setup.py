"""Builds tpext._C against the installed torch.

CPU-only when torch has no CUDA (or TPEXT_FORCE_CPU=1); with torch's CUDA build it also compiles the
hand-written kernels in csrc/kernels and the CUDA host code (-DTPEXT_WITH_CUDA: own NCCL communicator,
streams), and links libnccl. Always install with `pip install --no-build-isolation`, so the build uses the
torch already installed instead of fetching another one.

Before anything is compiled, every requirement of the build is checked and a missing one is named with
its fix (README, "Building with CUDA"): setuptools that can build wheels, a supported torch, ninja, and
for a CUDA build the toolkit behind `nvcc` (also when `nvcc` on PATH is a wrapper script outside it) with
the cuBLAS and NCCL headers, taken from NVIDIA's wheels (torch's own dependencies) where the toolkit lacks
them.
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

# The torch versions tpext is built and tested against in CI (.ci/run: 2.11 with CUDA 13.0, 2.13 CPU).
MIN_TORCH, NEWEST_TESTED_TORCH = (2, 11), (2, 13)


def _fail(problem: str, fix: str):
    raise SystemExit(f"\ntpext build: {problem}\n  fix: {fix}\n")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _check_setuptools():
    import setuptools

    # `pip install -e .` builds a wheel: setuptools < 70.1 needs the separate `wheel` package for that, and
    # --no-build-isolation does not install pyproject's build requirements.
    if _version_tuple(setuptools.__version__) < (70, 1) and importlib.util.find_spec("wheel") is None:
        _fail(
            f"setuptools {setuptools.__version__} cannot build wheels without the `wheel` package "
            "(pyproject's build requirements are not installed under --no-build-isolation)",
            "pip install wheel   (or a setuptools >= 70.1 that your torch allows)",
        )


_check_setuptools()

try:
    import torch
except ImportError:  # an isolated build environment has no torch
    _fail(
        "torch is not importable here",
        "install torch first, then `pip install --no-build-isolation -e .` "
        "(without --no-build-isolation pip builds in an empty environment)",
    )

if _version_tuple(torch.__version__) < MIN_TORCH:
    _fail(
        f"torch {torch.__version__} is older than the oldest supported, {'.'.join(map(str, MIN_TORCH))}",
        f"pip install 'torch>={'.'.join(map(str, MIN_TORCH))}'",
    )
if _version_tuple(torch.__version__)[:2] > NEWEST_TESTED_TORCH:
    print(
        f"tpext build: warning: torch {torch.__version__} is newer than the newest tested, "
        f"{'.'.join(map(str, NEWEST_TESTED_TORCH))}; run the test suite (python -m pytest) before relying on it",
        file=sys.stderr,
    )
if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
    _fail("ninja is missing (the extension is compiled with it, in parallel)", "pip install ninja")

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
FORCE_CPU = os.environ.get("TPEXT_FORCE_CPU", "0") == "1"
CUDA_BUILD = torch.version.cuda is not None and not FORCE_CPU


def _find_nvcc() -> str:
    for candidate in (
        os.environ.get("CUDACXX"),
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _fail(
        f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but no nvcc was found "
        "(CUDACXX, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin)",
        f"install the CUDA {torch.version.cuda} toolkit (or put its bin/ on PATH, or set CUDA_HOME), or "
        "build without the CUDA kernels: TPEXT_FORCE_CPU=1 pip install --no-build-isolation -e .",
    )


def _toolkit_root(nvcc: str) -> tuple[str, str]:
    """The toolkit behind `nvcc` and its version, as nvcc itself reports them: `nvcc --dryrun` prints
    TOP=<its own bin>/.., which is right also when the `nvcc` on PATH is a wrapper script elsewhere."""
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        _fail(f"{nvcc} could not be run ({exc})", "point CUDACXX or CUDA_HOME at a working CUDA toolkit")
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
    release = re.search(r"release (\d+\.\d+)", ver)
    if not top or not release:
        _fail(
            f"{nvcc} did not say where its toolkit is (no TOP= in `nvcc --dryrun`, or no release in "
            "`nvcc --version`)",
            "set CUDA_HOME to the CUDA toolkit's root",
        )
    return os.path.realpath(top.group(1).strip()), release.group(1)


def _wheel_include_dirs(header: str) -> list[str]:
    """include/ folders of NVIDIA's pip wheels (nvidia/<pkg>/include: cu13 for CUDA 13's cuBLAS, nccl) that
    hold `header`. torch's CUDA build depends on these wheels, so they match what it loads at run time."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(
        {os.path.dirname(p) for root in roots for p in glob.glob(os.path.join(root, "*", "include", header))}
    )


def _cuda_setup() -> tuple[list[str], list[str]]:
    """Checks the CUDA side of the build; returns (include dirs, link args). Sets CUDA_HOME for torch's
    extension builder, which otherwise guesses it from the directory of the `nvcc` on PATH."""
    nvcc = _find_nvcc()
    home, release = _toolkit_root(nvcc)
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        _fail(
            f"the CUDA toolkit at {home} (from {nvcc}) has no include/cuda_runtime.h",
            "set CUDA_HOME to a complete CUDA toolkit",
        )
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        _fail(
            f"nvcc is CUDA {release} ({nvcc}) but torch {torch.__version__} is built with CUDA "
            f"{torch.version.cuda}; their major versions must match",
            f"use a CUDA {torch.version.cuda.split('.')[0]}.x toolkit (CUDA_HOME or PATH), or the torch "
            f"build for CUDA {release}",
        )
    os.environ["CUDA_HOME"] = home
    cuda_major = int(torch.version.cuda.split(".")[0])
    include_dirs = []
    for header, what, wheel in (
        ("cublas_v2.h", "cuBLAS", "nvidia-cublas" if cuda_major >= 13 else f"nvidia-cublas-cu{cuda_major}"),
        ("nccl.h", "NCCL", f"nvidia-nccl-cu{cuda_major}"),
    ):
        if os.path.isfile(os.path.join(home, "include", header)):
            continue
        found = _wheel_include_dirs(header)
        if not found:
            _fail(
                f"the {what} headers ({header}) are neither in the CUDA toolkit at {home} nor in NVIDIA's "
                "pip wheels beside torch",
                f"pip install {wheel} (the version torch's CUDA build requires: "
                f"`pip show torch` lists it), or install {what} into the toolkit",
            )
        include_dirs += found[:1]
    return include_dirs, _nccl_link_args()


def _nccl_link_args() -> list[str]:
    """Link libnccl: from the nvidia-nccl wheel torch's CUDA build loads (rpath'd, so the extension finds
    the very library torch uses), else the toolkit's / system's libnccl."""
    for inc in _wheel_include_dirs("nccl.h"):
        lib_dir = os.path.join(os.path.dirname(inc), "lib")
        libs = sorted(glob.glob(os.path.join(lib_dir, "libnccl.so*")))
        if libs:
            return [f"-L{lib_dir}", f"-l:{os.path.basename(libs[-1])}", f"-Wl,-rpath,{lib_dir}"]
    return ["-lnccl"]


def _extension():
    # Reads CUDA_HOME when first imported (set by _cuda_setup by then); set again below in case
    # something imported it earlier.
    from torch.utils import cpp_extension

    sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True)
    )
    torch_version = torch.__version__.split("+")[0]
    # No -std flag: torch's extension builder passes the standard its own headers need (C++17 or C++20).
    cxx = ["-O3", f'-DTPEXT_TORCH_VERSION="{torch_version}"']
    include_dirs = [CSRC]
    if not CUDA_BUILD:
        return cpp_extension.CppExtension(
            "tpext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}
        )
    cuda_includes, link_args = CUDA_SETUP
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "kernels", "*.cu")))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-DTPEXT_WITH_CUDA"]
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is None:
        # Hopper first (sm_90a unlocks wgmma/TMA); TORCH_CUDA_ARCH_LIST picks others.
        nvcc += ["-gencode=arch=compute_90a,code=sm_90a"]
    print(
        f"tpext build: CUDA {torch.version.cuda} with the toolkit at {os.environ['CUDA_HOME']}; archs "
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '9.0a')}; headers from {cuda_includes or 'the toolkit'}",
        file=sys.stderr,
    )
    return cpp_extension.CUDAExtension(
        "tpext._C",
        sources,
        include_dirs=include_dirs + cuda_includes,
        extra_compile_args={"cxx": cxx + ["-DTPEXT_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link_args,
    )


CUDA_SETUP = _cuda_setup() if CUDA_BUILD else ([], [])
EXTENSION = _extension()

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension  # noqa: E402

setup(
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
