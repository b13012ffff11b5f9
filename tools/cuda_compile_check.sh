#!/usr/bin/env bash
# CI compile check of tpext's CUDA code: builds every CMake target (kernels library, kernel tests,
# benchmarks, NCCL/cuBLAS header check, and the extension's C++ sources compiled with -DTPEXT_WITH_CUDA
# against the headers of the torch that `python3` imports, objects only) for sm_90a, with warnings as errors, on a machine
# that has nvcc but no GPU. Nothing is run. CMakeLists.txt fails the configure if any .cu under csrc/, tests/cpp/ or
# bench/ is left out of a target, so "green" means every .cu in the repo compiled.
#
#   tools/cuda_compile_check.sh            # exit 0: all compiled (or no nvcc: skipped); non-zero: error
#
# Every executable is linked too (TPEXT_REQUIRE_LINK): against libcublas and libnccl from NVIDIA's wheels
# in the cached torch CUDA venv (tools/cuda_venv.sh), the libraries torch itself loads.
#
# Environment: TPEXT_NCCL_INCLUDE_DIR and TPEXT_CUBLAS_INCLUDE_DIR, when both set, are used instead of
# the venv's wheels (libraries looked up in ../lib beside each); TPEXT_CUDA_ARCHS overrides 90a; CUDACXX
# picks the nvcc; TPEXT_MAX_SPILL_BYTES (32) is the most spill bytes a kernel may have;
# TPEXT_ALLOW_SPILLS=1 only reports.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build/cuda-check"
start=$SECONDS

nvcc="${CUDACXX:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" ]]; then
  echo "cuda_compile_check: skipped: no nvcc (CUDA code not compiled on this machine)"
  exit 0
fi
for tool in cmake ninja; do
  command -v "$tool" >/dev/null || { echo "cuda_compile_check: $tool not found (needed with nvcc)" >&2; exit 1; }
done

if [[ -n "${TPEXT_NCCL_INCLUDE_DIR:-}" && -n "${TPEXT_CUBLAS_INCLUDE_DIR:-}" ]]; then
  nccl_inc="$TPEXT_NCCL_INCLUDE_DIR"
  cublas_inc="$TPEXT_CUBLAS_INCLUDE_DIR"
else
  # NVIDIA's wheels that torch's CUDA build depends on: headers and the libraries beside them, so the
  # kernel tests and benches link against the very cuBLAS and NCCL that torch loads.
  venv="$(bash "$root/tools/cuda_venv.sh" | tail -n 1)"
  site="$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  nccl_inc="$site/nvidia/nccl/include"
  cublas_inc="$site/nvidia/cu13/include"
fi

echo "cuda_compile_check: $("$nvcc" --version | tail -n 2 | head -n 1)"
cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DTPEXT_CUDA_ARCHS="${TPEXT_CUDA_ARCHS:-90a}" \
  -DTPEXT_WERROR=ON \
  -DTPEXT_REQUIRE_LINK=ON \
  -DTPEXT_PTXAS_VERBOSE=ON \
  -DTPEXT_NCCL_INCLUDE_DIR="$nccl_inc" \
  -DTPEXT_CUBLAS_INCLUDE_DIR="$cublas_inc"
cmake --build "$build" --parallel "$(nproc 2>/dev/null || echo 4)"

# Summary: every .cu that went through nvcc (from the compile database) and the objects it made.
python3 - "$build/compile_commands.json" "$root" <<'PY'
import json, os, shlex, sys
db, root = sys.argv[1:]
entries = [e for e in json.load(open(db)) if e["file"].endswith(".cu")]
cu = sorted({os.path.relpath(e["file"], root) for e in entries})
def output(e):  # the object named after -o (CMake 3.25 writes no "output" key for CUDA)
    args = shlex.split(e["command"])
    return os.path.join(e["directory"], args[args.index("-o") + 1])
missing = [output(e) for e in entries if not os.path.isfile(output(e))]
print(f"cuda_compile_check: {len(cu)} .cu files compiled (objects up to date):")
for f in cu:
    print(f"  {f}")
host = sorted({os.path.relpath(e["file"], root) for e in json.load(open(db))
               if e["file"].endswith(".cpp") and "-DTPEXT_WITH_CUDA" in e["command"]})
print(f"cuda_compile_check: {len(host)} extension .cpp files compiled with -DTPEXT_WITH_CUDA (no link):")
for f in host:
    print(f"  {f}")
if missing:
    sys.exit(f"cuda_compile_check: objects missing after the build: {missing}")
PY
# Register spills of the kernels library (ptxas -v, kept per object by tools/ptxas_log.sh): a spill is
# local-memory traffic in a kernel that was written not to have any, usually a launch bound too tight
# for its register use. Every spill is listed; more than TPEXT_MAX_SPILL_BYTES (32) in one kernel fails,
# unless TPEXT_ALLOW_SPILLS=1.
python3 "$root/tools/ptxas_spills.py" "$build/CMakeFiles/tpext_kernels.dir"
echo "cuda_compile_check: OK in $((SECONDS - start)) s (archs ${TPEXT_CUDA_ARCHS:-90a}, build dir ${build#"$root"/})"
