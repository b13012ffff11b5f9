#!/usr/bin/env bash
# Prints (last line of stdout) a virtual environment holding the GPU machines' torch, the CUDA 13.0 build
# torch==2.11.0+cu130 from PyPI, with NVIDIA's wheels it depends on (cuBLAS, NCCL, cudart ..., headers and
# libraries), plus what tpext's build and test suite need. It installs and imports on a machine without
# a GPU, so tpext's CUDA build is built, linked, imported and tested here (tools/cuda_build_check.sh), and
# the CMake targets compile and link against the very cuBLAS / NCCL that torch loads
# (tools/cuda_compile_check.sh).
#
# Cached as ${TPEXT_CACHE:-$HOME/.cache/tpext}/venv-torch<version>: about 2.5 GB downloaded once (a minute
# or two), reused by later runs on the same machine. A stamp written last marks it complete, so an
# interrupted install is redone, not reused. TPEXT_CUDA_TORCH picks another torch version.
set -euo pipefail

TORCH_VERSION="${TPEXT_CUDA_TORCH:-2.11.0}"
# The build and test requirements of the README's test command, minus torch (pinned above).
PACKAGES=(numpy pybind11 ninja wheel safetensors tqdm matplotlib pytest pytest-timeout transformers==5.23.0)

venv="${TPEXT_CACHE:-$HOME/.cache/tpext}/venv-torch$TORCH_VERSION"
stamp="$venv/.tpext-complete"
want="torch==$TORCH_VERSION ${PACKAGES[*]}"
log() { echo "cuda_venv: $*" >&2; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  log "cached: $venv"
  echo "$venv"
  exit 0
fi

start=$SECONDS
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
log "installing $want into $venv"
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off "torch==$TORCH_VERSION" \
    "${PACKAGES[@]}" >"$venv.log" 2>&1; then
  grep -v "^WARNING: Location" "$venv.log" | tail -n 40 >&2
  log "FAILED: pip install (whole log: $venv.log)"
  exit 1
fi
"$venv/bin/python" - <<'PY' >&2
import torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"cuda_venv: torch {torch.__version__} (CUDA {torch.version.cuda}) imports")
PY
echo "$want" >"$stamp"
log "ready in $((SECONDS - start)) s: $venv"
echo "$venv"
