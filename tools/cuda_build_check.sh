#!/usr/bin/env bash
# Builds tpext the way a GPU user does, on a machine with nvcc but no GPU, and tests that build:
#
#   1. a venv with the GPU machines' torch, 2.11.0+cu130 (tools/cuda_venv.sh, cached);
#   2. a copy of the working tree (tracked and untracked-not-ignored files) in build/cuda-build/src, so
#      its in-place tpext/_C*.so never collides with the CPU build of the checkout itself;
#   3. there, README's "Building with CUDA" command, verbatim:
#        TORCH_CUDA_ARCH_LIST=9.0a pip install --no-build-isolation -e .
#   4. checks: tpext imports with tpext.cuda_compiled True, and the whole CPU test suite passes against
#      this build (gloo tensors run through the host code compiled with -DTPEXT_WITH_CUDA; the
#      registration test checks every op's CUDA / AutocastCUDA / CPU / Meta kernels).
#
#   tools/cuda_build_check.sh             # exit 0: built, imported, suite green; no nvcc: skipped
#   tools/cuda_build_check.sh -k autocast # extra arguments go to pytest
#
# Environment: TPEXT_CUDA_TORCH (torch version, default 2.11.0), TPEXT_CACHE (venv cache root),
# TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS (compile jobs; torch's default is every core).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$root/build/cuda-build"
start=$SECONDS
log() { echo "cuda_build_check: $*"; }

if ! command -v nvcc >/dev/null && [[ ! -x /usr/local/cuda/bin/nvcc && -z "${CUDA_HOME:-}" ]]; then
  log "skipped: no nvcc (the CUDA build needs the CUDA toolkit's compiler)"
  exit 0
fi

venv="$(bash "$root/tools/cuda_venv.sh" | tail -n 1)"
py="$venv/bin/python"
log "torch $("$py" -c 'import torch; print(torch.__version__)') from $venv ($((SECONDS - start)) s)"

# A fresh copy each run. pip's editable build compiles in a temporary folder, so nothing is reused anyway.
rm -rf "$work/src"
mkdir -p "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$work/src" -xf -
cd "$work/src"

build_start=$SECONDS
log "building: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} pip install --no-build-isolation -e ."
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" "$py" -m pip install --disable-pip-version-check \
    --no-build-isolation -e . >"$work/build.log" 2>&1; then
  grep -v "^WARNING: Location" "$work/build.log" | tail -n 80
  log "FAILED: the CUDA build (whole log: ${work#"$root"/}/build.log)"
  exit 1
fi
grep -E "^tpext build:" "$work/build.log" || true
log "built in $((SECONDS - build_start)) s"

"$py" - <<'PY'
import torch
import tpext

assert tpext.cuda_compiled, "tpext imported, but was built without CUDA"
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tpext::"))
print(f"cuda_build_check: tpext imports from {tpext.__file__} with cuda_compiled=True; "
      f"{len(ops)} ops registered (torch {torch.__version__}, CUDA {torch.version.cuda})")
PY

test_start=$SECONDS
log "running the test suite against the CUDA build: python -m pytest $*"
# The venv's bin first: the console-script test must find this build's `tpext`, not another install's.
PATH="$venv/bin:$PATH" "$py" -m pytest -p no:cacheprovider "$@"
log "suite done in $((SECONDS - test_start)) s; OK in $((SECONDS - start)) s"
