"""Builds tpext._C against the installed torch.

CPU-only when torch has no CUDA or nvcc is missing; with torch's CUDA and nvcc it also compiles the
hand-written kernels in csrc/kernels and the CUDA host code (-DTPEXT_WITH_CUDA: own NCCL communicator,
streams), and links libnccl. Always install with `pip install --no-build-isolation`, so the
build uses the torch already installed instead of fetching another one.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # an isolated build environment has no torch
    raise SystemExit(
        "tpext builds against the installed torch: install torch first, then run "
        "`pip install --no-build-isolation -e .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _cuda_build() -> bool:
    if os.environ.get("TPEXT_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _nccl_include_dirs() -> list[str]:
    """NCCL headers from the nvidia-nccl wheel torch's CUDA build depends on (not part of the toolkit)."""
    try:
        import nvidia.nccl  # type: ignore[import-not-found]
    except ImportError:
        return []
    return [os.path.join(p, "include") for p in nvidia.nccl.__path__ if os.path.isdir(os.path.join(p, "include"))]


def _nccl_link_args() -> list[str]:
    """Link libnccl: from the nvidia-nccl wheel torch's CUDA build loads (rpath'd, so the extension finds
    the very library torch uses), else the toolkit's / system's libnccl."""
    try:
        import nvidia.nccl  # type: ignore[import-not-found]
    except ImportError:
        nccl_dirs = []
    else:
        nccl_dirs = [os.path.join(p, "lib") for p in nvidia.nccl.__path__]
    for lib_dir in nccl_dirs:
        libs = sorted(glob.glob(os.path.join(lib_dir, "libnccl.so*")))
        if libs:
            return [f"-L{lib_dir}", f"-l:{os.path.basename(libs[-1])}", f"-Wl,-rpath,{lib_dir}"]
    return ["-lnccl"]


def _extension():
    sources = sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True)
    )
    torch_version = torch.__version__.split("+")[0]
    # No -std flag: torch's extension builder passes the standard its own headers need (C++17 or C++20).
    cxx = ["-O3", f'-DTPEXT_TORCH_VERSION="{torch_version}"']
    include_dirs = [CSRC]
    if not _cuda_build():
        return cpp_extension.CppExtension("tpext._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx})
    sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "kernels", "*.cu")))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-DTPEXT_WITH_CUDA"]
    if archs is None:
        # Hopper first (sm_90a unlocks wgmma/TMA); the device the build runs on otherwise.
        nvcc += ["-gencode=arch=compute_90a,code=sm_90a"]
    return cpp_extension.CUDAExtension(
        "tpext._C", sources, include_dirs=include_dirs + _nccl_include_dirs(),
        extra_compile_args={"cxx": cxx + ["-DTPEXT_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=_nccl_link_args(),
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
